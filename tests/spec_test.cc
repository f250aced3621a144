// docs/FORMAT.md as another implementer reads it: each rule the spec
// settles (key forms, key kinds, duplicate keys, UTF-8, devices, set
// order) has a case here.
#include <bit>
#include <catch2/catch.hpp>
#include <cmath>
#include <limits>
#include <set>

#include "catch_util.h"
#include "craft.h"
#include "tree_internal.h"

using namespace ckpt;
using namespace ckpt::test;

namespace {

double FromBits(uint64_t b) { return std::bit_cast<double>(b); }

// A file whose root is what `make` returns.
std::vector<std::byte> Build(const std::string& path,
                             const std::function<Result<NodeId>(Writer&)>& make,
                             WriteOptions o = Fast()) {
  auto w = Writer::Create(path, o);
  REQUIRE(w.ok());
  auto root = make(*w);
  INFO(root.status().ToString());
  REQUIRE(root.ok());
  REQUIRE(w->SetRoot(*root).ok());
  Status s = w->Commit();
  INFO(s.ToString());
  REQUIRE(s.ok());
  return ReadAll(path);
}

// Commit's status for a tree built by `make` (which may also fail).
Status TryBuild(const std::string& path,
                const std::function<Result<NodeId>(Writer&)>& make) {
  CKPT_ASSIGN_OR_RETURN(Writer w, Writer::Create(path, Fast()));
  CKPT_ASSIGN_OR_RETURN(NodeId root, make(w));
  CKPT_RETURN_IF_ERROR(w.SetRoot(root));
  return w.Commit();
}

Result<NodeId> Scalar(Writer& w, float v) {
  return w.AddTensor(DType::kFloat32, {}, std::as_bytes(std::span(&v, 1)));
}

uint16_t StampedMinor(const std::vector<std::byte>& f) {
  return static_cast<uint16_t>(static_cast<unsigned>(f[10]) |
                               static_cast<unsigned>(f[11]) << 8);
}

// {"k": (1, 2)}: a dict whose one key is a tuple, to mutate.
// Nodes (post-order): 1, 2, (1,2), "v"-value 0 ... see the writer's order:
// key then value per entry, so: 1, 2, tuple, 7, root.
std::vector<std::byte> TupleKeyFile(const std::string& path) {
  return Build(path, [](Writer& w) -> Result<NodeId> {
    NodeId t[] = {w.AddInt(1), w.AddInt(2)};
    CKPT_ASSIGN_OR_RETURN(NodeId tup, w.AddTuple(t));
    NodeId k[] = {tup};
    NodeId v[] = {w.AddInt(7)};
    return w.AddDict(k, v);
  });
}

}  // namespace

// ---- 7.3 float keys
// ------------------------------------------------------------

TEST_CASE("7.3: float keys are written as Python's repr()") {
  // Bit patterns and Python 3's repr() of each (CPython, float_repr_style
  // 'short'); the same table is in docs/FORMAT.md 7.3.
  const std::pair<uint64_t, const char*> table[] = {
      {0x0000000000000000, "0.0"},
      {0x8000000000000000, "-0.0"},
      {0x3ff0000000000000, "1.0"},
      {0xbff0000000000000, "-1.0"},
      {0x3fe0000000000000, "0.5"},
      {0x3fb999999999999a, "0.1"},
      {0x3fd5555555555555, "0.3333333333333333"},
      {0x4059000000000000, "100.0"},
      {0x430c6bf526340000, "1000000000000000.0"},
      {0x4341c37937e08000, "1e+16"},
      {0x434aa535d3d0c000, "1.5e+16"},
      {0x437b69b4ba630f35, "1.2345678901234568e+17"},
      {0x4340000000000000, "9007199254740992.0"},
      {0x43e0000000000000, "9.223372036854776e+18"},
      {0x4480f0cf064dd592, "1e+22"},
      {0x3f1a36e2eb1c432d, "0.0001"},
      {0x3ee4f8b588e368f1, "1e-05"},
      {0x3f202e4b6ce5dc68, "0.00012345"},
      {0x3ee9e3abe16fc70d, "1.2345e-05"},
      {0xbe90c6f7a0b5ed8d, "-2.5e-07"},
      {0x0000000000000001, "5e-324"},
      {0x0010000000000000, "2.2250738585072014e-308"},
      {0x7fefffffffffffff, "1.7976931348623157e+308"},
      {0x54b249ad2594c37d, "1e+100"},
      {0x2b2bff2ee48e0530, "1e-100"},
      {0x400921f9f01b866e, "3.14159"},
      {0x40c81cd6c8b43958, "12345.678"},
      {0x7ff0000000000000, "inf"},
      {0xfff0000000000000, "-inf"},
      {0x7ff8000000000000, "nan"},
      {0xfff8000000000000, "nan"},  // the sign of a NaN is not written
      {0x7ff0000000000001, "nan"},  // nor its payload
  };
  for (auto [bits, want] : table) {
    INFO(std::hex << bits);
    CHECK(internal::FormatDouble(FromBits(bits)) == want);
  }
  // Complex keys use the same float form inside complex(RE,IM).
  TempDir dir;
  auto f = Build(dir.File("k.ckpt"), [](Writer& w) -> Result<NodeId> {
    std::vector<NodeId> keys = {w.AddFloat(1.0), w.AddFloat(1e16),
                                w.AddFloat(1e-5), w.AddComplex(1, -0.5)};
    std::vector<NodeId> values;
    for (int i = 0; i < 4; ++i) {
      CKPT_ASSIGN_OR_RETURN(NodeId t, Scalar(w, static_cast<float>(i)));
      values.push_back(t);
    }
    return w.AddDict(keys, values);
  });
  auto ck = Checkpoint::OpenBuffer(f, "k.ckpt");
  REQUIRE(ck.ok());
  REQUIRE(ck->num_tensors() == 4);
  for (const char* p : {"1.0", "1e+16", "1e-05", "complex(1.0,-0.5)"}) {
    INFO(p);
    CHECK(ck->Tensor(p).ok());
    CHECK(ck->Get(p).ok());
  }
  CHECK(ck->Verify().ok());
}

TEST_CASE(
    "7.3 and 9: a file with float keys is stamped 1.1; one without stays 1.0") {
  TempDir dir;
  auto plain = Build(dir.File("a.ckpt"), [](Writer& w) -> Result<NodeId> {
    NodeId k[] = {w.AddString("x"), w.AddInt(3)};
    NodeId v[] = {w.AddFloat(1.0), w.AddFloat(2.0)};  // float values, not keys
    return w.AddDict(k, v);
  });
  CHECK(StampedMinor(plain) == 0);
  auto nested = Build(dir.File("b.ckpt"), [](Writer& w) -> Result<NodeId> {
    NodeId t[] = {w.AddString("lr"),
                  w.AddFloat(0.5)};  // a float inside a tuple key
    CKPT_ASSIGN_OR_RETURN(NodeId tup, w.AddTuple(t));
    NodeId k[] = {tup};
    NodeId v[] = {w.AddNone()};
    return w.AddDict(k, v);
  });
  CHECK(StampedMinor(nested) == 1);
  auto ck = Checkpoint::OpenBuffer(nested, "b.ckpt");
  REQUIRE(ck.ok());
  CHECK(ck->format_minor() == 1);
  CHECK(ck->Get("(lr,0.5)").ok());
  // 1.0 files keep the 1.0 form (std::to_chars), chosen by the minor.
  CHECK(internal::FloatKeyFormFor(0) == internal::FloatKeyForm::kCxxToChars1_0);
  CHECK(internal::FloatKeyFormFor(1) == internal::FloatKeyForm::kPythonRepr);
  using internal::FloatKeyForm;
  CHECK(internal::FormatDouble(1.0, FloatKeyForm::kCxxToChars1_0) == "1");
  CHECK(internal::FormatDouble(1e-4, FloatKeyForm::kCxxToChars1_0) == "1e-04");
  CHECK(internal::FormatDouble(1e-4, FloatKeyForm::kPythonRepr) == "0.0001");
  // 1.0's form: fewest characters, then nearest: whole numbers keep their
  // exact digits (FORMAT.md 7.3 said "the same digits" before).
  CHECK(internal::FormatDouble(9223372036854775808.0,
                               FloatKeyForm::kCxxToChars1_0) ==
        "9223372036854775808");
  CHECK(internal::FormatDouble(1180591620717411303424.0,
                               FloatKeyForm::kCxxToChars1_0) ==
        "1180591620717411303424");
  CHECK(internal::FormatDouble(123456789012345678.0,
                               FloatKeyForm::kCxxToChars1_0) ==
        "123456789012345680");
}

TEST_CASE(
    "7.3: a 1.0 file's tensor under a float key verifies with the 1.0 path "
    "form") {
  // Written as 1.1 (path "1.0"), then made what a 1.0 writer wrote: path
  // "1" (std::to_chars) and minor 0. Verify (R16) must use the 1.0 form;
  // it used the 1.1 form for every file and refused such files.
  TempDir dir;
  std::vector<float> v = {1, 2};
  auto file = Build(dir.File("f.ckpt"), [&](Writer& w) -> Result<NodeId> {
    CKPT_ASSIGN_OR_RETURN(NodeId t,
                          w.AddTensor(DType::kFloat32, {2}, Bytes(v)));
    NodeId k[] = {w.AddFloat(1.0)};
    NodeId vals[] = {t};
    return w.AddDict(k, vals);
  });
  REQUIRE(StampedMinor(file) == 1);
  auto old =
      MutateHeader(file, [](fb::HeaderT& h) { h.tensors[0]->path = "1"; });
  old[internal::kOffMajor + 2] = std::byte{0};  // minor 0
  SealPreamble(old);
  auto ck = Checkpoint::OpenBuffer(old, "old.ckpt");
  REQUIRE(ck.ok());
  CHECK(ck->format_minor() == 0);
  CHECK(ck->Verify().ok());
  CHECK(ck->Get("1").ok());
  CHECK(ck->Tensor("1").ok());
}

// ---- 7.1 / R14 keys, sets, fields
// ----------------------------------------------

TEST_CASE(
    "R14: key kinds are checked at every depth of a tuple or frozenset key") {
  TempDir dir;
  // Writer: a tuple key holding a list, a frozenset key holding a tensor.
  RequireError(TryBuild(dir.File("a.ckpt"),
                        [](Writer& w) -> Result<NodeId> {
                          CKPT_ASSIGN_OR_RETURN(NodeId l, w.AddList({}));
                          NodeId t[] = {w.AddInt(1), l};
                          CKPT_ASSIGN_OR_RETURN(NodeId tup, w.AddTuple(t));
                          NodeId in[] = {tup};
                          CKPT_ASSIGN_OR_RETURN(NodeId outer, w.AddTuple(in));
                          NodeId k[] = {outer};
                          NodeId v[] = {w.AddNone()};
                          return w.AddDict(k, v);
                        }),
               ErrorCode::kInvalidArgument,
               "a tuple holding a list cannot be a dict key");
  RequireError(
      TryBuild(dir.File("b.ckpt"),
               [](Writer& w) -> Result<NodeId> {
                 CKPT_ASSIGN_OR_RETURN(NodeId t, Scalar(w, 1));
                 NodeId items[] = {t};
                 CKPT_ASSIGN_OR_RETURN(NodeId fs, w.AddFrozenSet(items));
                 return fs;
               }),
      ErrorCode::kInvalidArgument, "a tensor cannot be a frozenset item");
  // Reader: the tuple key's second item becomes a list (or a dict, or a
  // tensor reference).
  auto f = TupleKeyFile(dir.File("t.ckpt"));
  REQUIRE(OpenBytes(f).ok());
  for (auto kind :
       {fb::ValueKind::List, fb::ValueKind::Dict, fb::ValueKind::Set}) {
    RequireError(OpenBytes(MutateHeader(f,
                                        [&](fb::HeaderT& h) {
                                          h.nodes[1]->kind = kind;
                                          h.nodes[1]->int_value = 0;
                                        })),
                 ErrorCode::kCorrupt, "holding a");
  }
  RequireError(OpenBytes(MutateHeader(f,
                                      [&](fb::HeaderT& h) {
                                        h.nodes[1]->kind = fb::ValueKind::List;
                                        h.nodes[1]->int_value = 0;
                                      })),
               ErrorCode::kCorrupt,
               "a tuple holding a list cannot be a dict key");
}

TEST_CASE("R14: equal dict keys are refused, with Python's ==") {
  TempDir dir;
  using Maker = std::function<NodeId(Writer&)>;
  const std::vector<std::pair<Maker, Maker>> equal = {
      {[](Writer& w) { return w.AddString("a"); },
       [](Writer& w) { return w.AddString("a"); }},
      {[](Writer& w) { return w.AddInt(1); },
       [](Writer& w) { return w.AddFloat(1.0); }},
      {[](Writer& w) { return w.AddBool(true); },
       [](Writer& w) { return w.AddInt(1); }},
      {[](Writer& w) { return w.AddBool(false); },
       [](Writer& w) { return w.AddFloat(-0.0); }},
      {[](Writer& w) { return w.AddFloat(0.0); },
       [](Writer& w) { return w.AddFloat(-0.0); }},
      {[](Writer& w) { return w.AddComplex(2, 0); },
       [](Writer& w) { return w.AddInt(2); }},
      {[](Writer& w) { return w.AddComplex(-0.0, 1); },
       [](Writer& w) { return w.AddComplex(0, 1); }},
      {[](Writer& w) { return w.AddFloat(INFINITY); },
       [](Writer& w) { return w.AddComplex(INFINITY, 0); }},
      {[](Writer& w) { return w.AddNone(); },
       [](Writer& w) { return w.AddNone(); }},
      {[](Writer& w) { return w.AddDType(DType::kFloat32).value(); },
       [](Writer& w) { return w.AddDType(DType::kFloat32).value(); }},
      // 2**70 as a big int and as a float.
      {[](Writer& w) {
         std::vector<uint8_t> b(10, 0);
         b[8] = 0x40;
         return w.AddBigInt(b).value();
       },
       [](Writer& w) { return w.AddFloat(std::ldexp(1.0, 70)); }},
      {[](Writer& w) {
         NodeId t[] = {w.AddInt(1), w.AddString("x")};
         return w.AddTuple(t).value();
       },
       [](Writer& w) {
         NodeId t[] = {w.AddFloat(1.0), w.AddString("x")};
         return w.AddTuple(t).value();
       }},
      // frozensets compare as sets: {1, 2} == {2, 1}.
      {[](Writer& w) {
         NodeId t[] = {w.AddInt(1), w.AddInt(2)};
         return w.AddFrozenSet(t).value();
       },
       [](Writer& w) {
         NodeId t[] = {w.AddInt(2), w.AddFloat(1.0)};
         return w.AddFrozenSet(t).value();
       }},
  };
  for (size_t c = 0; c < equal.size(); ++c) {
    INFO("pair " << c);
    RequireError(
        TryBuild(dir.File("e.ckpt"),
                 [&](Writer& w) -> Result<NodeId> {
                   NodeId k[] = {equal[c].first(w), w.AddString("other"),
                                 equal[c].second(w)};
                   NodeId v[] = {w.AddInt(0), w.AddInt(1), w.AddInt(2)};
                   return w.AddDict(k, v);
                 }),
        ErrorCode::kInvalidArgument, "dict keys 0 (");
  }
  // Not equal in Python, so both stay: 1 and "1", b"a" and "a", two NaNs
  // (a NaN equals nothing), (1, 2) and frozenset({1, 2}), 1 and 1.5.
  auto f = Build(dir.File("ok.ckpt"), [](Writer& w) -> Result<NodeId> {
    NodeId t[] = {w.AddInt(1), w.AddInt(2)};
    NodeId s[] = {w.AddInt(1), w.AddInt(2)};
    uint8_t a = 'a';
    NodeId k[] = {
        w.AddInt(1),           w.AddString("1"),          w.AddBytes({&a, 1}),
        w.AddString("a"),      w.AddFloat(NAN),           w.AddFloat(NAN),
        w.AddTuple(t).value(), w.AddFrozenSet(s).value(), w.AddFloat(1.5)};
    std::vector<NodeId> v;
    for (int i = 0; i < 9; ++i) v.push_back(w.AddInt(i));
    return w.AddDict(k, v);
  });
  auto ck = Checkpoint::OpenBuffer(f, "ok.ckpt");
  INFO(ck.status().ToString());
  REQUIRE(ck.ok());
  CHECK(ck->root().size() == 9);
  CHECK(ck->Verify().ok());
  // ...but 1 and "1" cannot both hold tensors: their paths would collide.
  RequireError(TryBuild(dir.File("c.ckpt"),
                        [](Writer& w) -> Result<NodeId> {
                          NodeId k[] = {w.AddInt(1), w.AddString("1")};
                          CKPT_ASSIGN_OR_RETURN(NodeId a, Scalar(w, 1));
                          CKPT_ASSIGN_OR_RETURN(NodeId b, Scalar(w, 2));
                          NodeId v[] = {a, b};
                          return w.AddDict(k, v);
                        }),
               ErrorCode::kInvalidArgument, "two tensors have the path '1'");
  // PutTensor twice under one name is the same mistake.
  {
    auto w = Writer::Create(dir.File("p.ckpt"), Fast());
    REQUIRE(w.ok());
    float x = 1;
    REQUIRE(
        w->PutTensor("w", DType::kFloat32, {}, std::as_bytes(std::span(&x, 1)))
            .ok());
    REQUIRE(
        w->PutTensor("w", DType::kFloat32, {}, std::as_bytes(std::span(&x, 1)))
            .ok());
    RequireError(w->Commit(), ErrorCode::kInvalidArgument,
                 "dict keys 0 ('w') and 1 ('w')");
  }

  // Reader: crafted duplicates of several sorts.
  auto small = SmallFile(dir.File("s.ckpt"));
  // Nodes: "a", tensor a, "b", tensor b, "n", 5, root.
  RequireError(OpenBytes(MutateHeader(
                   small, [](fb::HeaderT& h) { h.nodes[2]->str_value = "a"; })),
               ErrorCode::kCorrupt, "dict keys 0 and 1 are equal");
  RequireError(OpenBytes(MutateHeader(small,
                                      [](fb::HeaderT& h) {
                                        // keys 7 and 7.0
                                        h.nodes[0]->kind = fb::ValueKind::Int;
                                        h.nodes[0]->str_value.clear();
                                        h.nodes[0]->int_value = 7;
                                        h.nodes[4]->kind = fb::ValueKind::Float;
                                        h.nodes[4]->str_value.clear();
                                        h.nodes[4]->float_value = 7.0;
                                      })),
               ErrorCode::kCorrupt, "dict keys 0 and 2 are equal");
}

TEST_CASE("R14: set items are restricted like keys: hashable and distinct") {
  TempDir dir;
  RequireError(TryBuild(dir.File("a.ckpt"),
                        [](Writer& w) -> Result<NodeId> {
                          CKPT_ASSIGN_OR_RETURN(NodeId l, w.AddList({}));
                          NodeId items[] = {w.AddInt(1), l};
                          return w.AddSet(items);
                        }),
               ErrorCode::kInvalidArgument, "a list cannot be a set item");
  RequireError(TryBuild(dir.File("b.ckpt"),
                        [](Writer& w) -> Result<NodeId> {
                          CKPT_ASSIGN_OR_RETURN(NodeId t, Scalar(w, 1));
                          NodeId items[] = {t};
                          return w.AddSet(items);
                        }),
               ErrorCode::kInvalidArgument, "a tensor cannot be a set item");
  RequireError(TryBuild(dir.File("c.ckpt"),
                        [](Writer& w) -> Result<NodeId> {
                          NodeId items[] = {w.AddInt(3), w.AddFloat(3.0)};
                          return w.AddSet(items);
                        }),
               ErrorCode::kInvalidArgument, "set items 0 ('3') and 1 ('3.0')");
  // Reader: a set {1, 2} whose item becomes a list, or a duplicate.
  auto f = Build(dir.File("s.ckpt"), [](Writer& w) -> Result<NodeId> {
    NodeId items[] = {w.AddInt(1), w.AddInt(2)};
    return w.AddSet(items);
  });
  REQUIRE(OpenBytes(f).ok());
  RequireError(OpenBytes(MutateHeader(f,
                                      [](fb::HeaderT& h) {
                                        h.nodes[0]->kind = fb::ValueKind::List;
                                        h.nodes[0]->int_value = 0;
                                      })),
               ErrorCode::kCorrupt, "a list cannot be a set item");
  RequireError(OpenBytes(MutateHeader(
                   f, [](fb::HeaderT& h) { h.nodes[1]->int_value = 1; })),
               ErrorCode::kCorrupt, "set items 0 and 1 are equal");
}

TEST_CASE("R14: fields a kind does not use must be absent or zero") {
  TempDir dir;
  auto f = SmallFile(dir.File("s.ckpt"));
  // Nodes: "a", tensor a, "b", tensor b, "n", 5 (Int), root (Dict).
  struct Case {
    const char* what;
    std::function<void(fb::NodeT&)> mutate;
    size_t node;
  };
  const Case cases[] = {
      {"kind int does not use str_value",
       [](fb::NodeT& n) { n.str_value = "x"; }, 5},
      {"kind int does not use float_value",
       [](fb::NodeT& n) { n.float_value = 1.5; }, 5},
      {"kind int does not use bytes_value",
       [](fb::NodeT& n) { n.bytes_value = {1}; }, 5},
      {"kind int does not use type_name",
       [](fb::NodeT& n) { n.type_name = "numpy.int64"; }, 5},
      {"kind string does not use int_value",
       [](fb::NodeT& n) { n.int_value = 3; }, 0},
      {"kind string does not use imag_value",
       [](fb::NodeT& n) { n.imag_value = 2; }, 0},
      {"kind dict does not use int_value",
       [](fb::NodeT& n) { n.int_value = 1; }, 6},
      {"kind tensor does not use str_value",
       [](fb::NodeT& n) { n.str_value = "a"; }, 1},
  };
  for (const auto& c : cases) {
    INFO(c.what);
    RequireError(OpenBytes(MutateHeader(
                     f, [&](fb::HeaderT& h) { c.mutate(*h.nodes[c.node]); })),
                 ErrorCode::kCorrupt, c.what);
  }
  // What the writer itself emits stays legal: -0.0 forces every scalar
  // field of its node out (int_value = 0, imag_value = 0 present).
  auto z = Build(dir.File("z.ckpt"), [](Writer& w) -> Result<NodeId> {
    NodeId items[] = {w.AddFloat(-0.0), w.AddComplex(0.0, -0.0)};
    return w.AddList(items);
  });
  auto ck = Checkpoint::OpenBuffer(z, "z.ckpt");
  INFO(ck.status().ToString());
  REQUIRE(ck.ok());
  CHECK(std::signbit(ck->Get("0").value().as_float()));
  CHECK(std::signbit(ck->Get("1").value().as_complex().imag()));
}

TEST_CASE("absent strings read as their defaults; a device must be present") {
  TempDir dir;
  auto f = Build(dir.File("d.ckpt"), [](Writer& w) -> Result<NodeId> {
    NodeId items[] = {w.AddString("x"), w.AddString("")};
    return w.AddList(items);
  });
  // The object API omits empty strings when packing: str_value, metadata
  // value and producer become absent.
  auto g = MutateHeader(f, [](fb::HeaderT& h) {
    h.nodes[0]->str_value.clear();
    h.producer.clear();
    auto kv = std::make_unique<fb::KeyValueT>();
    kv->key = "k";
    h.metadata.push_back(std::move(kv));
  });
  auto ck = Checkpoint::OpenBuffer(g, "g");
  INFO(ck.status().ToString());
  REQUIRE(ck.ok());
  CHECK(ck->Get("0").value().kind() == ValueKind::kString);
  CHECK(ck->Get("0").value().as_string().empty());
  CHECK(ck->Get("1").value().as_string().empty());
  CHECK(ck->producer().empty());
  CHECK(ck->Metadata("k").value().empty());
  CHECK(ck->root().type_name().empty());

  auto dev = Build(dir.File("v.ckpt"),
                   [](Writer& w) { return w.AddDevice("cuda:1"); });
  RequireError(OpenBytes(MutateHeader(
                   dev, [](fb::HeaderT& h) { h.nodes[0]->str_value.clear(); })),
               ErrorCode::kCorrupt, "device without a string");
  auto small = SmallFile(dir.File("s.ckpt"));
  RequireError(
      OpenBytes(MutateHeader(
          small, [](fb::HeaderT& h) { h.storages[0]->device.clear(); })),
      ErrorCode::kCorrupt, "storage 0: missing device string");
}

TEST_CASE("an absent String key reads as \"\" in lookups too") {
  // Get("x/") found no key "" when the key's str_value was absent.
  TempDir dir;
  auto f = Build(dir.File("k.ckpt"), [](Writer& w) -> Result<NodeId> {
    NodeId ik[] = {w.AddString("placeholder")};
    NodeId iv[] = {w.AddInt(5)};
    CKPT_ASSIGN_OR_RETURN(NodeId inner, w.AddDict(ik, iv));
    NodeId ok[] = {w.AddString("x")};
    NodeId ov[] = {inner};
    return w.AddDict(ok, ov);
  });
  auto g = MutateHeader(f, [](fb::HeaderT& h) {
    for (auto& n : h.nodes) {
      if (n->str_value == "placeholder") n->str_value.clear();
    }
  });
  auto ck = Checkpoint::OpenBuffer(g, "g");
  REQUIRE(ck.ok());
  auto v = ck->Get("x/");
  INFO(v.status().ToString());
  REQUIRE(v.ok());
  CHECK(v->as_int() == 5);
  CHECK(ck->Verify().ok());
}

TEST_CASE("R10: a zero element offset in a vector of tables is refused") {
  // The FlatBuffers Verifier accepts it (the element becomes its own
  // table, every field absent); FORMAT.md 8.1 says offsets are never 0.
  TempDir dir;
  auto f = SmallFile(dir.File("z.ckpt"));
  uint64_t hoff = GetU64(f, internal::kOffHeaderOffset);
  uint64_t hsize = GetU64(f, internal::kOffHeaderSize);
  auto* base = reinterpret_cast<const uint8_t*>(f.data() + hoff);
  const auto* nodes = fb::GetHeader(base)->nodes();
  REQUIRE(nodes->size() > 1);
  size_t at = static_cast<size_t>(nodes->Data() - base);
  std::memset(f.data() + hoff + at, 0, 4);  // nodes[0] = offset 0
  PutU64(f, internal::kOffHeaderHash,
         internal::Xxh3({f.data() + hoff, static_cast<size_t>(hsize)}));
  SealPreamble(f);
  RequireError(OpenBytes(f), ErrorCode::kCorrupt, "zero offset");
}

TEST_CASE(
    "8.2: a shape with a 0 size has 0 elements whatever the other sizes") {
  // [2^33, 2^33, 0] was refused as overflowing while [0, 2^33, 2^33] was
  // accepted: the count depended on the order of multiplication.
  TempDir dir;
  for (auto shape :
       {std::vector<int64_t>{int64_t{1} << 33, int64_t{1} << 33, 0},
        std::vector<int64_t>{0, int64_t{1} << 33, int64_t{1} << 33}}) {
    auto w = Writer::Create(dir.File("e.ckpt"), Fast());
    REQUIRE(w.ok());
    auto sid = w->AddStorage(std::span<const std::byte>());
    REQUIRE(sid.ok());
    TensorSpec t{DType::kFloat32, shape, {0, 0, 0}, *sid, 0};
    auto node = w->AddTensor(t);
    INFO(node.status().ToString());
    REQUIRE(node.ok());
    REQUIRE(w->PutValue("e", *node).ok());
    REQUIRE(w->Commit().ok());
    auto ck = Checkpoint::Open(dir.File("e.ckpt"));
    REQUIRE(ck.ok());
    CHECK(ck->TensorInfoAt(0)->numel() == 0);
    CHECK(ck->Verify().ok());
  }
}

// ---- R19 UTF-8
// --------------------------------------------------------------------

TEST_CASE("R19: UTF-8 is well-formed or refused") {
  using internal::Utf8Problem;
  for (std::string ok :
       {std::string(""), std::string("ascii"), std::string("nul\0in", 6),
        std::string("\xc3\xa9"), std::string("\xe2\x82\xac"),
        std::string("\xed\x9f\xbf"),  // U+D7FF
        std::string("\xee\x80\x80"),  // U+E000
        std::string("\xef\xbf\xbe"),  // U+FFFE (a noncharacter, still UTF-8)
        std::string("\xf0\x9f\x98\x80"),     // U+1F600
        std::string("\xf4\x8f\xbf\xbf")}) {  // U+10FFFF
    INFO(ok);
    CHECK_FALSE(Utf8Problem(ok).has_value());
  }
  const std::pair<std::string, size_t> bad[] = {
      {"\xff", 0},
      {"ab\x80", 2},            // lone continuation byte
      {"\xc0\x80", 0},          // overlong NUL
      {"\xc1\xbf", 0},          // overlong
      {"\xe0\x9f\xbf", 0},      // overlong 3-byte
      {"\xf0\x8f\xbf\xbf", 0},  // overlong 4-byte
      {"\xed\xa0\x80", 0},      // surrogate U+D800
      {"x\xed\xbf\xbf", 1},     // surrogate U+DFFF
      {"\xf4\x90\x80\x80", 0},  // U+110000
      {"\xf5\x80\x80\x80", 0},
      {"\xe2\x82", 0},      // truncated
      {"\xe2\x28\xa1", 0},  // bad continuation
      {"ok\xf0\x9f\x98", 2},
  };
  for (const auto& [s, at] : bad) {
    INFO(s);
    REQUIRE(Utf8Problem(s).has_value());
    CHECK(*Utf8Problem(s) == at);
  }
}

TEST_CASE(
    "R19: invalid UTF-8 is rejected at open, wherever the format says UTF-8") {
  TempDir dir;
  auto f = SmallFile(dir.File("s.ckpt"));
  const std::string bad = "caf\xc3";  // truncated é
  RequireError(OpenBytes(MutateHeader(
                   f, [&](fb::HeaderT& h) { h.nodes[4]->str_value = bad; })),
               ErrorCode::kCorrupt, "string is not valid UTF-8 (byte 3 of 4)");
  RequireError(
      OpenBytes(MutateHeader(
          f, [&](fb::HeaderT& h) { h.nodes.back()->type_name = bad; })),
      ErrorCode::kCorrupt, "type_name is not valid UTF-8");
  RequireError(OpenBytes(MutateHeader(f,
                                      [&](fb::HeaderT& h) {
                                        auto kv =
                                            std::make_unique<fb::KeyValueT>();
                                        kv->key = bad;
                                        h.metadata.push_back(std::move(kv));
                                      })),
               ErrorCode::kCorrupt, "metadata key 0 is not valid UTF-8");
  RequireError(OpenBytes(MutateHeader(f,
                                      [&](fb::HeaderT& h) {
                                        auto kv =
                                            std::make_unique<fb::KeyValueT>();
                                        kv->key = "k";
                                        kv->value = bad;
                                        h.metadata.push_back(std::move(kv));
                                      })),
               ErrorCode::kCorrupt, "metadata value of 'k' is not valid UTF-8");
  RequireError(
      OpenBytes(MutateHeader(f, [&](fb::HeaderT& h) { h.producer = bad; })),
      ErrorCode::kCorrupt, "producer is not valid UTF-8");
  // Tensor "b" renamed to "b\xff" (still sorted after "a"): its path.
  RequireError(OpenBytes(MutateHeader(
                   f, [&](fb::HeaderT& h) { h.tensors[1]->path = "b\xff"; })),
               ErrorCode::kCorrupt,
               "tensor 1: tensor path is not valid UTF-8 (byte 1 of 2)");
}

TEST_CASE("R19: the writer refuses invalid UTF-8 instead of writing it") {
  TempDir dir;
  const std::string bad = "\xed\xa0\x80";  // a surrogate
  RequireError(
      TryBuild(dir.File("a.ckpt"),
               [&](Writer& w) -> Result<NodeId> {
                 NodeId items[] = {w.AddString("fine"), w.AddString(bad)};
                 return w.AddList(items);
               }),
      ErrorCode::kInvalidArgument, "the string at '1' is not valid UTF-8");
  {
    auto w = Writer::Create(dir.File("b.ckpt"), Fast());
    REQUIRE(w.ok());
    REQUIRE(w->PutValue(bad, w->AddInt(1)).ok());
    RequireError(w->Commit(), ErrorCode::kInvalidArgument, "not valid UTF-8");
    auto w2 = Writer::Create(dir.File("b.ckpt"), Fast());
    REQUIRE(w2.ok());
    RequireError(w2->SetMetadata("k", bad), ErrorCode::kInvalidArgument,
                 "metadata value is not valid UTF-8");
    RequireError(w2->SetMetadata(bad, "v"), ErrorCode::kInvalidArgument,
                 "metadata key is not valid UTF-8");
    NodeId d = w2->AddDict({}, {}).value();
    RequireError(w2->SetTypeName(d, bad), ErrorCode::kInvalidArgument,
                 "not valid UTF-8");
  }
  WriteOptions o = Fast();
  o.producer = bad;
  RequireError(Writer::Create(dir.File("c.ckpt"), o).status(),
               ErrorCode::kInvalidArgument, "producer is not valid UTF-8");
  CHECK(dir.List().empty());  // nothing half-written left behind
}

// ---- devices
// ----------------------------------------------------------------------

TEST_CASE(
    "device grammar: TYPE or TYPE:INDEX, no leading zeros, INDEX < 2^31") {
  using internal::DeviceProblem;
  for (auto d : {"cpu", "cuda", "cuda:0", "cuda:15", "mps", "meta", "xla:3",
                 "_x1", "privateuse1", "cuda:2147483647"}) {
    INFO(d);
    CHECK_FALSE(DeviceProblem(d).has_value());
  }
  const std::pair<const char*, const char*> bad[] = {
      {"", "empty"},
      {"0cuda", "must start with a letter"},
      {"cuda:", "no index"},
      {"cuda:x", "not a decimal"},
      {"cu da", "only letters, digits"},
      {"cuda:0:1", "not a decimal"},
      {"cuda:-1", "not a decimal"},
      {"cuda:+1", "not a decimal"},
      {"cuda:01", "leading zero"},
      {"cuda:00", "leading zero"},
      {"cuda:2147483648", "above 2^31 - 1"},
      {"cuda:99999999999999999999", "above 2^31 - 1"},
      {"caf\xc3\xa9", "only letters"},
  };
  for (auto [d, why] : bad) {
    INFO(d);
    REQUIRE(DeviceProblem(d).has_value());
    CHECK(DeviceProblem(d)->find(why) != std::string::npos);
  }
  CHECK(DeviceProblem(std::string(64, 'a')) == std::nullopt);
  CHECK(DeviceProblem(std::string(65, 'a')).has_value());

  TempDir dir;
  auto f = Build(dir.File("d.ckpt"),
                 [](Writer& w) { return w.AddDevice("cuda:1"); });
  RequireError(
      OpenBytes(MutateHeader(
          f, [](fb::HeaderT& h) { h.nodes[0]->str_value = "cuda:01"; })),
      ErrorCode::kCorrupt, "leading zero");
  RequireError(OpenBytes(MutateHeader(f,
                                      [](fb::HeaderT& h) {
                                        h.nodes[0]->str_value =
                                            "cuda:99999999999999999999";
                                      })),
               ErrorCode::kCorrupt, "above 2^31 - 1");
  auto small = SmallFile(dir.File("s.ckpt"));
  RequireError(
      OpenBytes(MutateHeader(
          small, [](fb::HeaderT& h) { h.storages[0]->device = "cuda:007"; })),
      ErrorCode::kCorrupt, "storage 0: invalid device string");
  // The writer applies the same grammar.
  auto w = Writer::Create(dir.File("w.ckpt"), Fast());
  REQUIRE(w.ok());
  RequireError(w->AddDevice("cuda:01").status(), ErrorCode::kInvalidArgument,
               "leading zero");
  RequireError(w->BeginStorage(0, "cuda:2147483648").status(),
               ErrorCode::kInvalidArgument, "above 2^31 - 1");
}

// ---- section 8
// -------------------------------------------------------------------

TEST_CASE("R13: bool fields of a tensor other than 0 or 1 are rejected") {
  TempDir dir;
  auto f = MutateHeader(SmallFile(dir.File("s.ckpt")), [](fb::HeaderT& h) {
    h.tensors[0]->requires_grad = true;  // now present in the buffer
  });
  REQUIRE(OpenBytes(f).ok());
  uint64_t hoff = GetU64(f, internal::kOffHeaderOffset);
  auto* h = fb::GetHeader(reinterpret_cast<const uint8_t*>(f.data() + hoff));
  const auto* table =
      reinterpret_cast<const flatbuffers::Table*>(h->tensors()->Get(0));
  const uint8_t* field = table->GetAddressOf(fb::Tensor::VT_REQUIRES_GRAD);
  REQUIRE(field != nullptr);
  f[static_cast<size_t>(reinterpret_cast<const std::byte*>(field) - f.data())] =
      std::byte{2};
  ResealHeader(f);
  RequireError(OpenBytes(f), ErrorCode::kCorrupt,
               "requires_grad byte is 2, neither 0 nor 1");
}

TEST_CASE(
    "R10: 8-byte vector elements must be 8-aligned (the Verifier does not "
    "check)") {
  TempDir dir;
  auto f = SmallFile(dir.File("s.ckpt"));
  fb::HeaderT obj = UnpackHeader(f);
  bool tried = false;
  // Tensor 0's shape is written as a [ubyte] vector (4-aligned only) holding
  // the int64 bytes; filler before it moves it until it lands at 4 mod 8.
  for (size_t pad = 0; pad < 8 && !tried; ++pad) {
    flatbuffers::FlatBufferBuilder fbb;
    std::vector<flatbuffers::Offset<fb::Storage>> st;
    for (const auto& s : obj.storages)
      st.push_back(fb::Storage::Pack(fbb, s.get()));
    std::vector<flatbuffers::Offset<fb::Node>> nd;
    for (const auto& n : obj.nodes) nd.push_back(fb::Node::Pack(fbb, n.get()));
    std::vector<flatbuffers::Offset<fb::Tensor>> ts;
    for (size_t i = 0; i < obj.tensors.size(); ++i) {
      const fb::TensorT& t = *obj.tensors[i];
      flatbuffers::Offset<flatbuffers::Vector<int64_t>> shape;
      if (i == 0) {
        if (pad) fbb.CreateVector(std::vector<uint8_t>(pad, 0));
        std::vector<uint8_t> raw(8 * t.shape.size());
        std::memcpy(raw.data(), t.shape.data(), raw.size());
        shape = flatbuffers::Offset<flatbuffers::Vector<int64_t>>(
            fbb.CreateVector(raw).o);
      } else {
        shape = fbb.CreateVector(t.shape);
      }
      auto strides = fbb.CreateVector(t.strides);
      ts.push_back(fb::CreateTensor(fbb, fbb.CreateString(t.path), t.dtype,
                                    shape, strides, t.storage, t.storage_offset,
                                    t.requires_grad, t.is_parameter));
    }
    auto h = fb::CreateHeader(fbb, obj.chunk_size, fbb.CreateVector(st),
                              fbb.CreateVector(ts), fbb.CreateVector(nd), 0,
                              fbb.CreateString(obj.producer));
    fb::FinishHeaderBuffer(fbb, h);
    const auto* data = fb::GetHeader(fbb.GetBufferPointer())
                           ->tensors()
                           ->Get(0)
                           ->shape()
                           ->data();
    // The builder's buffer starts 8-aligned, as the file's header does.
    if (reinterpret_cast<uintptr_t>(data) % 8 == 0) {
      // Aligned this time: the file is valid, and opens.
      CHECK(OpenBytes(ReplaceHeader(f, fbb)).ok());
      continue;
    }
    tried = true;
    RequireError(OpenBytes(ReplaceHeader(f, fbb)), ErrorCode::kCorrupt,
                 "tensor 0's shape or strides has 8-byte elements that are not "
                 "8-aligned");
  }
  CHECK(tried);
}

TEST_CASE("BigInt: writers store the fewest bytes, readers take 1 to 4096") {
  TempDir dir;
  auto w = Writer::Create(dir.File("b.ckpt"), Fast());
  REQUIRE(w.ok());
  // 5 in ten bytes: an Int node.
  std::vector<uint8_t> five(10, 0);
  five[0] = 5;
  // -(2**32767): 4096 bytes, given in 4097 (as int.to_bytes((bl + 8) // 8)
  // computes it).
  std::vector<uint8_t> min4096(4097, 0);
  min4096[4095] = 0x80;
  min4096[4096] = 0xff;
  // 2**32767 needs 4097 bytes: too big.
  std::vector<uint8_t> big(4097, 0);
  big[4095] = 0x80;
  // 2**64 - 1 with a redundant sign byte: 9 bytes stay (it needs them).
  std::vector<uint8_t> u64max(10, 0);
  for (int i = 0; i < 8; ++i) u64max[static_cast<size_t>(i)] = 0xff;
  std::vector<uint8_t> minus1(12, 0xff);
  NodeId items[] = {w->AddBigInt(five).value(), w->AddBigInt(min4096).value(),
                    w->AddBigInt(u64max).value(), w->AddBigInt(minus1).value()};
  RequireError(w->AddBigInt(big).status(), ErrorCode::kInvalidArgument,
               "at most 4096");
  RequireError(w->AddBigInt({}).status(), ErrorCode::kInvalidArgument,
               "no bytes");
  REQUIRE(w->SetRoot(w->AddList(items).value()).ok());
  REQUIRE(w->Commit().ok());
  auto f = ReadAll(dir.File("b.ckpt"));
  auto ck = Checkpoint::OpenBuffer(f, "b");
  REQUIRE(ck.ok());
  CHECK(ck->Get("0").value().kind() == ValueKind::kInt);
  CHECK(ck->Get("0").value().as_int() == 5);
  CHECK(ck->Get("1").value().kind() == ValueKind::kBigInt);
  CHECK(ck->Get("1").value().as_bytes().size() == 4096);
  CHECK(ck->Get("2").value().as_bytes().size() == 9);
  CHECK(ck->Get("2").value().BigIntToDecimal() == "18446744073709551615");
  CHECK(ck->Get("3").value().as_int() == -1);
  // A reader takes a non-minimal big int by value, up to 4096 bytes.
  auto g = MutateHeader(f, [](fb::HeaderT& h) {
    h.nodes[0]->kind = fb::ValueKind::BigInt;
    h.nodes[0]->int_value = 0;
    h.nodes[0]->bytes_value.assign(4096, 0);
    h.nodes[0]->bytes_value[0] = 7;
  });
  auto ck2 = Checkpoint::OpenBuffer(g, "g");
  INFO(ck2.status().ToString());
  REQUIRE(ck2.ok());
  CHECK(ck2->Get("0").value().BigIntToDecimal() == "7");
  RequireError(
      OpenBytes(MutateHeader(
          g, [](fb::HeaderT& h) { h.nodes[0]->bytes_value.push_back(0); })),
      ErrorCode::kCorrupt, "big int of 4097 bytes");
}

TEST_CASE(
    "empty blobs: offsets never decrease, an empty blob may end the data") {
  TempDir dir;
  auto w = Writer::Create(dir.File("e.ckpt"), Fast());
  REQUIRE(w.ok());
  std::vector<std::byte> three(3, std::byte{1});
  std::vector<NodeId> items;
  for (auto bytes :
       {std::span<const std::byte>(), std::span<const std::byte>(),
        std::span<const std::byte>(three), std::span<const std::byte>()}) {
    StorageId s = w->AddStorage(bytes).value();
    TensorSpec t;
    t.dtype = DType::kUInt8;
    t.shape = {static_cast<int64_t>(bytes.size())};
    t.storage = s;
    items.push_back(w->AddTensor(t).value());
  }
  REQUIRE(w->SetRoot(w->AddList(items).value()).ok());
  REQUIRE(w->Commit().ok());
  auto ck = Checkpoint::Open(dir.File("e.ckpt"));
  INFO(ck.status().ToString());
  REQUIRE(ck.ok());
  REQUIRE(ck->num_storages() == 4);
  CHECK(ck->StorageInfoAt(0)->offset ==
        ck->StorageInfoAt(1)->offset);  // two empty blobs share one
  CHECK(ck->StorageInfoAt(2)->offset ==
        ck->StorageInfoAt(1)->offset);  // so does the next
  CHECK(ck->StorageInfoAt(3)->offset >= ck->StorageInfoAt(2)->offset + 3);
  CHECK(ck->StorageInfoAt(3)->offset ==
        ck->layout().data_offset + ck->layout().data_size);  // at the very end
  CHECK(ck->Verify().ok());
}

TEST_CASE(
    "R15: metadata is sorted byte-wise (unsigned), as the writer stores it") {
  TempDir dir;
  auto w = Writer::Create(dir.File("m.ckpt"), Fast());
  REQUIRE(w.ok());
  REQUIRE(
      w->SetMetadata("\xc3\xa9t\xc3\xa9", "summer").ok());  // "été": 0xC3 > 'z'
  REQUIRE(w->SetMetadata("z", "last letter").ok());
  REQUIRE(w->SetMetadata("Z", "upper").ok());
  REQUIRE(w->PutValue("x", w->AddInt(1)).ok());
  REQUIRE(w->Commit().ok());
  auto f = ReadAll(dir.File("m.ckpt"));
  auto ck = Checkpoint::OpenBuffer(f, "m");
  REQUIRE(ck.ok());
  auto md = ck->metadata();
  REQUIRE(md.size() == 3);
  CHECK(md[0].first == "Z");
  CHECK(md[1].first == "z");
  CHECK(md[2].first == "\xc3\xa9t\xc3\xa9");
  // Signed-char order would put "été" first: a reader must refuse that.
  RequireError(OpenBytes(MutateHeader(f,
                                      [](fb::HeaderT& h) {
                                        std::rotate(h.metadata.begin(),
                                                    h.metadata.begin() + 2,
                                                    h.metadata.end());
                                      })),
               ErrorCode::kCorrupt, "metadata keys are not sorted");
}

TEST_CASE(
    "R13: packed dtypes count bytes in the shape, not the values packed") {
  TempDir dir;
  auto w = Writer::Create(dir.File("p.ckpt"), Fast());
  REQUIRE(w.ok());
  std::vector<uint8_t> bytes = {0x12, 0x34, 0x56};  // six float4 values
  REQUIRE(w->PutTensor("f4", DType::kFloat4E2M1FNx2, {3},
                       std::as_bytes(std::span(bytes)))
              .ok());
  CHECK_FALSE(w->PutTensor("f4b", DType::kFloat4E2M1FNx2, {6},
                           std::as_bytes(std::span(bytes)))
                  .ok());
  REQUIRE(w->Commit().ok());
  auto ck = Checkpoint::Open(dir.File("p.ckpt"));
  REQUIRE(ck.ok());
  CHECK(ck->FindTensor("f4").value().nbytes() == 3);
}

TEST_CASE("R14: depth 1000 is read, 1001 is refused at open") {
  TempDir dir;
  auto f = Build(dir.File("d.ckpt"), [](Writer& w) -> Result<NodeId> {
    NodeId cur = w.AddInt(1);
    for (uint32_t i = 1; i < kMaxTreeDepth; ++i) {
      NodeId one[] = {cur};
      CKPT_ASSIGN_OR_RETURN(cur, w.AddList(one));
    }
    return cur;
  });
  REQUIRE(OpenBytes(f).ok());
  RequireError(OpenBytes(MutateHeader(
                   f,
                   [](fb::HeaderT& h) {
                     auto top = std::make_unique<fb::NodeT>();
                     top->kind = fb::ValueKind::List;
                     top->items = {static_cast<uint32_t>(h.nodes.size() - 1)};
                     h.nodes.push_back(std::move(top));
                   })),
               ErrorCode::kCorrupt, "nesting deeper than 1000");
  // Tuple keys nest too, and count: a key 1000 tuples deep is too deep.
  RequireError(TryBuild(dir.File("k.ckpt"),
                        [](Writer& w) -> Result<NodeId> {
                          NodeId cur = w.AddInt(1);
                          for (uint32_t i = 1; i < kMaxTreeDepth; ++i) {
                            NodeId one[] = {cur};
                            CKPT_ASSIGN_OR_RETURN(cur, w.AddTuple(one));
                          }
                          NodeId k[] = {cur};
                          NodeId v[] = {w.AddNone()};
                          return w.AddDict(k, v);
                        }),
               ErrorCode::kInvalidArgument, "deeper than 1000");
  // A key 100,000 tuples deep (a hostile pickle can make one) is refused
  // at AddDict, before anything recurses down it.
  RequireError(TryBuild(dir.File("h.ckpt"),
                        [](Writer& w) -> Result<NodeId> {
                          NodeId cur = w.AddInt(1);
                          for (int i = 0; i < 100000; ++i) {
                            NodeId one[] = {cur};
                            CKPT_ASSIGN_OR_RETURN(cur, w.AddTuple(one));
                          }
                          NodeId k[] = {cur};
                          NodeId v[] = {w.AddNone()};
                          return w.AddDict(k, v);
                        }),
               ErrorCode::kInvalidArgument,
               "a dict key nested deeper than 1000 levels");
}

// ---- section 10
// ---------------------------------------------------------------------

TEST_CASE(
    "10: set items are stored in canonical order, so equal sets give equal "
    "bytes") {
  TempDir dir;
  // The same set, given in two orders (as two Python processes with
  // different string hash seeds would iterate it).
  auto make = [](bool reversed) {
    return [reversed](Writer& w) -> Result<NodeId> {
      std::vector<NodeId> items;
      auto add = [&](NodeId n) { items.push_back(n); };
      uint8_t b = 0xff;
      add(w.AddString("b"));
      add(w.AddString("a"));
      add(w.AddString("B"));
      add(w.AddInt(-5));
      add(w.AddInt(3));
      add(w.AddFloat(-1.5));
      add(w.AddFloat(0.5));
      add(w.AddBool(true));
      add(w.AddNone());
      add(w.AddBytes({&b, 1}));
      NodeId t1[] = {w.AddInt(1), w.AddString("z")};
      add(w.AddTuple(t1).value());
      NodeId t2[] = {w.AddInt(1)};
      add(w.AddTuple(t2).value());
      if (reversed) std::reverse(items.begin(), items.end());
      CKPT_ASSIGN_OR_RETURN(NodeId set, w.AddSet(items));
      // A frozenset used as a key: its path form follows the same order.
      NodeId fs_items[] = {reversed ? w.AddString("y") : w.AddString("x"),
                           reversed ? w.AddString("x") : w.AddString("y")};
      CKPT_ASSIGN_OR_RETURN(NodeId fs, w.AddFrozenSet(fs_items));
      CKPT_ASSIGN_OR_RETURN(NodeId t, Scalar(w, 1));
      NodeId k[] = {w.AddString("set"), fs};
      NodeId v[] = {set, t};
      return w.AddDict(k, v);
    };
  };
  auto a = Build(dir.File("a.ckpt"), make(false));
  auto b = Build(dir.File("b.ckpt"), make(true));
  CHECK(a == b);
  auto ck = Checkpoint::OpenBuffer(a, "a");
  REQUIRE(ck.ok());
  // Kind codes: None 0 < Bool 1 < Int 2 < Float 4 < String 6 < Bytes 7 <
  // Tuple 9.
  const char* want[] = {"None", "True", "-5", "3",    "-1.5", "0.5",
                        "B",    "a",    "b",  "0xff", "(1,)", "(1,z)"};
  Value set = ck->Get("set").value();
  REQUIRE(set.size() == 12);
  for (size_t i = 0; i < 12; ++i) {
    INFO(i);
    CHECK(set.item(i).KeySegment() == want[i]);
  }
  CHECK(ck->Tensor("(x,y)").ok());
}

TEST_CASE(
    "kValueKinds: one row per schema kind, named as the schema names it") {
  // The table in format.h drives the reader's checks; the schema's enum is
  // the format. Their codes are static_asserted in lib/header.cc; here the
  // names too (the schema's, lower-cased).
  REQUIRE(kValueKinds.size() == static_cast<size_t>(fb::ValueKind::MAX) + 1);
  for (const auto& row : kValueKinds) {
    std::string schema =
        fb::EnumNameValueKind(static_cast<fb::ValueKind>(row.kind));
    for (char& c : schema) c = static_cast<char>(std::tolower(c));
    CHECK(std::string(row.name) == schema);
    CHECK(ValueKindFromCode(static_cast<uint8_t>(row.kind)) == row.kind);
    // Containers hold items; only containers do.
    CHECK(row.container == ((row.fields & kFieldItems) != 0));
  }
  CHECK_FALSE(ValueKindFromCode(kMaxValueKindCode + 1).has_value());
  CHECK(ValueKindName(static_cast<ValueKind>(200)) == "unknown");
}

TEST_CASE(
    "R14: every field a kind's row does not list is refused, for every kind") {
  // Walks the whole table: for each kind, a node of that kind carrying
  // each field the table says it does not use must fail to open, naming
  // the kind and the field. Node 5 of SmallFile is the Int 5, a leaf under
  // the root dict, so the kind can change without breaking the tree.
  TempDir dir;
  auto f = SmallFile(dir.File("s.ckpt"));
  const std::pair<NodeField, std::function<void(fb::NodeT&)>> fields[] = {
      {kFieldInt, [](fb::NodeT& n) { n.int_value = 7; }},
      {kFieldFloat, [](fb::NodeT& n) { n.float_value = 0.5; }},
      {kFieldImag, [](fb::NodeT& n) { n.imag_value = 0.5; }},
      {kFieldStr, [](fb::NodeT& n) { n.str_value = "z"; }},
      {kFieldBytes, [](fb::NodeT& n) { n.bytes_value = {1}; }},
      {kFieldTypeName, [](fb::NodeT& n) { n.type_name = "x.Y"; }},
  };
  int refused = 0;
  for (const auto& row : kValueKinds) {
    // A Tensor node must name an unreferenced tensor: the case above
    // covers its unused fields on a real tensor node.
    if (row.kind == ValueKind::kTensor) continue;
    for (const auto& [field, set] : fields) {
      if (row.fields & field) continue;
      INFO(std::string(row.name) + " with " +
           std::string(NodeFieldName(field)));
      auto bytes = MutateHeader(f, [&](fb::HeaderT& h) {
        fb::NodeT& n = *h.nodes[5];
        n = fb::NodeT();
        n.kind = static_cast<fb::ValueKind>(row.kind);
        // The kind's own fields hold legal values so that only the
        // unused one can be what is refused.
        if (row.kind == ValueKind::kBigInt) n.bytes_value = {1};
        if (row.kind == ValueKind::kDevice) n.str_value = "cpu";
        if (row.kind == ValueKind::kDType) n.int_value = 1;
        set(n);
      });
      RequireError(OpenBytes(bytes), ErrorCode::kCorrupt,
                   "kind " + std::string(row.name) + " does not use " +
                       std::string(NodeFieldName(field)));
      ++refused;
    }
  }
  CHECK(refused > 40);
}

namespace {
PathKey K(ValueKind kind) {
  PathKey k;
  k.kind = kind;
  return k;
}
PathKey KInt(int64_t v) {
  PathKey k = K(ValueKind::kInt);
  k.int_value = v;
  return k;
}
PathKey KStr(std::string s) {
  PathKey k = K(ValueKind::kString);
  k.text = std::move(s);
  return k;
}
PathKey KFloat(double v) {
  PathKey k = K(ValueKind::kFloat);
  k.float_value = v;
  return k;
}
PathKey KSeq(ValueKind kind, std::vector<PathKey> items) {
  PathKey k = K(kind);
  k.items = std::move(items);
  return k;
}
}  // namespace

TEST_CASE("7.2: PathBuilder joins segments as FORMAT.md says") {
  PathBuilder b;
  CHECK(b.path().empty());
  CHECK(b.depth() == 0);
  b.Push("model");
  b.Push("fc/w~");
  CHECK(b.path() == "model/fc~1w~0");
  b.Pop();
  b.Push("0");
  CHECK(b.path() == "model/0");
  b.Pop();
  b.Pop();
  b.Pop();  // no-op at the root
  CHECK(b.path().empty());
  // A root key "" has the empty path; its child's path starts with '/'.
  b.Push("");
  CHECK(b.path().empty());
  CHECK(b.depth() == 1);
  b.Push("a");
  CHECK(b.path() == "/a");
  CHECK(PathBuilder::Child("", true, "a") == "a");
  CHECK(PathBuilder::Child("", false, "a") == "/a");
  CHECK(JoinPath({"", "a"}) == "/a");
}

TEST_CASE("7.3: KeySegment gives each key the form the writer gives it") {
  PathKey big = K(ValueKind::kBigInt);
  big.bytes = {0, 0, 0, 0, 0, 0, 0, 0, 0x40};  // 2^70
  PathKey cplx = K(ValueKind::kComplex);
  cplx.float_value = 1.0;
  cplx.imag_value = -2.5;
  PathKey bytes = K(ValueKind::kBytes);
  bytes.bytes = {0x00, 0xff};
  PathKey yes = K(ValueKind::kBool);
  yes.int_value = 1;
  PathKey dt = K(ValueKind::kDType);
  dt.int_value = static_cast<int64_t>(DType::kBFloat16);
  PathKey dev = K(ValueKind::kDevice);
  dev.text = "cuda:1";
  const std::pair<PathKey, std::string> cases[] = {
      {KStr("fc.weight"), "fc.weight"},
      {KInt(-3), "-3"},
      {big, "1180591620717411303424"},
      {KFloat(1.0), "1.0"},
      {KFloat(1e20), "1e+20"},
      {cplx, "complex(1.0,-2.5)"},
      {bytes, "0x00ff"},
      {yes, "True"},
      {K(ValueKind::kNone), "None"},
      {dt, "bfloat16"},
      {dev, "cuda:1"},
      {KSeq(ValueKind::kTuple, {KInt(1), KStr("a")}), "(1,a)"},
      {KSeq(ValueKind::kTuple, {KInt(1)}), "(1,)"},
      {KSeq(ValueKind::kTuple, {}), "()"},
      // Canonical order, whatever order the caller lists them in.
      {KSeq(ValueKind::kFrozenSet, {KInt(2), KInt(1)}), "(1,2)"},
      {KSeq(ValueKind::kTuple,
            {KSeq(ValueKind::kFrozenSet, {KStr("b"), KStr("a")}), KInt(0)}),
       "((a,b),0)"},
  };
  for (const auto& [key, form] : cases) {
    INFO(form);
    auto seg = KeySegment(key);
    INFO(seg.status().ToString());
    REQUIRE(seg.ok());
    CHECK(*seg == form);
  }
  // The same keys through the writer: the file's tensor paths are what
  // KeySegment + PathBuilder say (the reader checks R16 on open).
  TempDir dir;
  auto f = Build(dir.File("k.ckpt"), [&](Writer& w) -> Result<NodeId> {
    std::vector<NodeId> keys, values;
    float x = 1;
    auto bytes_of = std::as_bytes(std::span<const float>(&x, 1));
    NodeId set_items[] = {w.AddInt(2), w.AddInt(1)};
    CKPT_ASSIGN_OR_RETURN(NodeId fs, w.AddFrozenSet(set_items));
    NodeId tup_items[] = {w.AddInt(1), w.AddString("a")};
    CKPT_ASSIGN_OR_RETURN(NodeId tup, w.AddTuple(tup_items));
    keys = {fs, tup, w.AddFloat(1.0)};
    for (size_t i = 0; i < keys.size(); ++i) {
      CKPT_ASSIGN_OR_RETURN(StorageId st, w.AddStorage(bytes_of));
      CKPT_ASSIGN_OR_RETURN(NodeId t, w.AddTensor(TensorSpec{
                                          .dtype = DType::kFloat32,
                                          .shape = {1},
                                          .strides = {1},
                                          .storage = st,
                                      }));
      values.push_back(t);
    }
    NodeId inner_key = w.AddString("m");
    CKPT_ASSIGN_OR_RETURN(NodeId inner, w.AddDict(keys, values));
    NodeId outer_keys[] = {inner_key};
    NodeId outer_values[] = {inner};
    return w.AddDict(outer_keys, outer_values);
  });
  auto ck = Checkpoint::OpenBuffer(f, "k.ckpt");
  INFO(ck.status().ToString());
  REQUIRE(ck.ok());
  std::set<std::string> paths;
  for (size_t i = 0; i < ck->num_tensors(); ++i) {
    paths.insert(ck->TensorInfoAt(i)->path);
  }
  std::set<std::string> expect;
  for (const PathKey& k :
       {KSeq(ValueKind::kFrozenSet, {KInt(1), KInt(2)}),
        KSeq(ValueKind::kTuple, {KInt(1), KStr("a")}), KFloat(1.0)}) {
    PathBuilder b;
    b.Push("m");
    b.Push(KeySegment(k).value());
    expect.insert(b.path());
  }
  CHECK(paths == expect);
}

TEST_CASE("7.3: KeySegment refuses keys a file cannot hold") {
  PathKey bad_utf8 = KStr("\xff");
  PathKey bad_dev = K(ValueKind::kDevice);
  bad_dev.text = "cuda:01";
  PathKey bad_dtype = K(ValueKind::kDType);
  bad_dtype.int_value = 200;
  PathKey empty_big = K(ValueKind::kBigInt);
  PathKey deep = KInt(0);
  for (int i = 0; i < 1001; ++i) deep = KSeq(ValueKind::kTuple, {deep});
  const std::pair<PathKey, std::string> cases[] = {
      {K(ValueKind::kList), "a list cannot be a dict key"},
      {K(ValueKind::kDict), "a dict cannot be a dict key"},
      {K(ValueKind::kTensor), "a tensor cannot be a dict key"},
      {KSeq(ValueKind::kTuple, {KInt(1), K(ValueKind::kSet)}),
       "a set cannot be a dict key"},
      {bad_utf8, "string is not valid UTF-8 (byte 0 of 1)"},
      {bad_dev, "invalid device string"},
      {bad_dtype, "unknown dtype code 200"},
      {empty_big, "big int of 0 bytes"},
      {KSeq(ValueKind::kString, {KInt(1)}), "a string has no items"},
      {deep, "nested deeper than 1000"},
  };
  for (const auto& [key, why] : cases) {
    INFO(why);
    RequireError(KeySegment(key).status(), ErrorCode::kInvalidArgument, why);
  }
}

TEST_CASE("Get names the walked path in errors, also under a key \"\"") {
  TempDir dir;
  auto f = Build(dir.File("e.ckpt"), [](Writer& w) -> Result<NodeId> {
    NodeId ik[] = {w.AddString("a")};
    NodeId iv[] = {w.AddInt(1)};
    CKPT_ASSIGN_OR_RETURN(NodeId inner, w.AddDict(ik, iv));
    NodeId ok[] = {w.AddString("")};
    NodeId ov[] = {inner};
    return w.AddDict(ok, ov);
  });
  auto ck = Checkpoint::OpenBuffer(f, "e.ckpt");
  REQUIRE(ck.ok());
  REQUIRE(ck->Get("/a").ok());
  // Below the entry "" (path ""), not at the root.
  RequireError(ck->Get("/b").status(), ErrorCode::kNotFound, "at ''");
  RequireError(ck->Get("b").status(), ErrorCode::kNotFound, "at the root");
}

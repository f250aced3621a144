// docs/FORMAT.md as another implementer reads it: each rule the spec
// settles (key forms, key kinds, duplicate keys, UTF-8, devices, set
// order) has a case here.
#include <catch2/catch.hpp>

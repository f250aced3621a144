// Defects found by outside material (issue 10, items 1-7): empty
// containers, expanded views, files overwritten under an open handle,
// files larger than memory, killed saves, permissions and long names.
#include <catch2/catch.hpp>

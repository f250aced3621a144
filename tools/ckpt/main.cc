// The ckpt executable; the commands are in lib/cli/cli.cc.
#include "cli/cli.h"

int main(int argc, char** argv) { return ckpt::tool::CliMain(argc, argv); }

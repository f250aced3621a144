// The ckpt executable; the commands are in cli.cc.
#include "cli.h"

int main(int argc, char** argv) { return ckpt::tool::CliMain(argc, argv); }

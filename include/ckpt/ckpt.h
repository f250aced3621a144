// Umbrella header for the ckpt library.
#pragma once

#include "ckpt/format.h"
#include "ckpt/reader.h"
#include "ckpt/status.h"
#include "ckpt/writer.h"

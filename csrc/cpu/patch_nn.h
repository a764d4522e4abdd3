// What patch_nn.cpp exports besides its ops.
#pragma once

#include <cstdint>
#include <utility>

namespace fastgen {
namespace cpu {

// (tiles in all pruned sweeps, tiles actually computed) since the process started:
// how much the ball bounds skip, for fastgen.info(), tests and benchmarks.
std::pair<int64_t, int64_t> patch_nn_prune_stats();

}  // namespace cpu
}  // namespace fastgen

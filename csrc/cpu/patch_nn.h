// What patch_nn.cpp exports besides its ops.
#pragma once

#include <cstdint>
#include <utility>

namespace fastgen {
namespace cpu {

// ((query, key) pairs in all pruned sweeps, pairs whose distance was computed) since
// the process started: how much the ball bounds skip, for fastgen.info(), tests and
// benchmarks.
std::pair<int64_t, int64_t> patch_nn_prune_stats();

}  // namespace cpu
}  // namespace fastgen

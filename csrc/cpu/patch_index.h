// What patch_index.cpp exports besides its class (torch.classes.fastgen.PatchIndex).
#pragma once

#include <cstdint>
#include <utility>

namespace fastgen {
namespace cpu {

// ((query, key) pairs in all pruned searches of this process, pairs whose distance was
// computed): how much the ball bounds skip, for fastgen.info(), tests and benchmarks.
// Each PatchIndex also counts its own (PatchIndex.pairs()).
std::pair<int64_t, int64_t> patch_nn_prune_stats();

}  // namespace cpu
}  // namespace fastgen

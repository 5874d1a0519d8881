// Routing-path trie shared by the CPU and CUDA implementations (SPEC 5.2).
//
// Layout: the trie is stored level by level ("level order"), one structure-of-arrays per node:
//
//   parent      int32   index of the parent inside the previous level; for depth-1 nodes the start
//                       layer s (each start layer has its own implicit root, which is not stored)
//   expert      int16   expert id of the edge into this node
//   count       int64   tokens whose (sub-)path passes through this node
//   reward_sum  float64 sum of those tokens' rewards (float64 so that CPU and CUDA sums agree)
//   first_seen  int32   step of the update that created the node
//   last_seen   int32   step of the latest update that touched it
//
// = 30 bytes per node, and no index beside it: level_sizes[d] (one int64 per level) says how many
// nodes depth d+1 holds. Inside a level the nodes are sorted by (parent, expert), strictly
// increasing. Because parents are themselves sorted this way, the order inside every level is the
// canonical order of SPEC 5.4 restricted to that level, so an update is a merge of the existing
// level with the batch's level, and to_table is a preorder walk of these arrays.
//
// routing_update is functional: it returns new arrays and never writes into its inputs, so a
// failure anywhere leaves the caller's trie as it was.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>

namespace memtrace {

using TrieArrays = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Expert ids occupy the low 16 bits of a level key (parent << 16 | expert).
constexpr int kExpertBits = 16;
constexpr int64_t kMaxExperts = 32767;
constexpr int64_t kMaxNodes = 2147483647;  // int32 parent indices

// count a + b for counts a, b >= 0, saturating at INT64_MAX instead of wrapping (issue 28).
#if defined(__CUDACC__)
__host__ __device__
#endif
inline int64_t saturating_add(int64_t a, int64_t b) {
  return (b > 0 && a > INT64_MAX - b) ? INT64_MAX : a + b;
}

// Checks shared by both devices (dtypes, shapes, devices). Value ranges are checked by each device's
// kernel, since any code can call the registered op (issue 28): every expert id in `paths` must lie in
// [-1, num_experts) (-1 cuts a path), and every trie node must have a parent inside the previous
// level (depth 1: a start layer in [0, L)), an expert id in [0, num_experts), a count >= 0, and each
// level must be strictly increasing in (parent, expert). A violation raises ValueError (c10::ValueError)
// before any output is built; the CPU checks on the host, the CUDA kernels clamp what they index with
// and count the violations into a device flag that is read together with a scalar the update already
// copies to the host (no extra sync), and the op raises there, before anything is written from them.
// Counts saturate at INT64_MAX instead of wrapping (each node still counts at least as many tokens
// as any one of its children). RoutingTree.update never gets there: it refuses an update that would
// take its token total (which bounds every count) past INT64_MAX; saturation guards direct op calls.
void check_update_args(const at::Tensor& parent, const at::Tensor& expert, const at::Tensor& count,
                       const at::Tensor& reward_sum, const at::Tensor& first_seen, const at::Tensor& last_seen,
                       at::IntArrayRef level_sizes, const at::Tensor& paths, const at::Tensor& rewards,
                       int64_t step, int64_t max_depth, int64_t num_experts);

// The CUDA op's two data checks raise through these, compiled by the host compiler in
// routing_trie_cpu.cpp: the .cu file passes plain integers and builds no message (a failed check
// raised from nvcc-compiled code took the process down on the H100).
[[noreturn]] void fail_bad_paths(int64_t bad, int64_t num_experts);
[[noreturn]] void fail_bad_nodes(int64_t bad, int64_t depth, int64_t num_experts);

TrieArrays routing_update_cpu(const at::Tensor& parent, const at::Tensor& expert, const at::Tensor& count,
                              const at::Tensor& reward_sum, const at::Tensor& first_seen,
                              const at::Tensor& last_seen, at::IntArrayRef level_sizes, const at::Tensor& paths,
                              const at::Tensor& rewards, int64_t step, int64_t max_depth, int64_t num_experts,
                              bool suffix);

#ifdef MEMTRACE_WITH_CUDA
TrieArrays routing_update_cuda(const at::Tensor& parent, const at::Tensor& expert, const at::Tensor& count,
                               const at::Tensor& reward_sum, const at::Tensor& first_seen,
                               const at::Tensor& last_seen, at::IntArrayRef level_sizes, const at::Tensor& paths,
                               const at::Tensor& rewards, int64_t step, int64_t max_depth, int64_t num_experts,
                               bool suffix);
#endif

}  // namespace memtrace

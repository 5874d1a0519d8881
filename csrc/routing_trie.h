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

// Start layers of the update: all L in suffix mode, else layer 0, and none when L == 0 (paths [N, 0]
// hold no layer 0 to read).
inline int64_t num_start_layers(int64_t num_layers, bool suffix) {
  return suffix ? num_layers : (num_layers > 0 ? 1 : 0);
}

// Checks shared by both devices (dtypes, shapes, devices). Value ranges are checked by each device's
// kernel, since any code can call the registered op (issue 28): every expert id in `paths` must lie in
// [-1, num_experts) (-1 cuts a path), and every trie node must have a parent inside the previous
// level (depth 1: a start layer in [0, L)), an expert id in [0, num_experts), a count >= 0, and each
// level must be strictly increasing in (parent, expert). A violation raises ValueError (c10::ValueError)
// before any output is built; the CPU checks on the host, the CUDA kernels clamp what they index with
// and count the violations into a device flag that is read together with a scalar the update already
// copies to the host (no extra sync); the update stops there, before anything is written from them,
// and returns the failure to host-compiled code that raises (see CudaUpdateResult).
// Counts saturate at INT64_MAX instead of wrapping (each node still counts at least as many tokens
// as any one of its children). RoutingTree.update never gets there: it refuses an update that would
// take its token total (which bounds every count) past INT64_MAX; saturation guards direct op calls.
void check_update_args(const at::Tensor& parent, const at::Tensor& expert, const at::Tensor& count,
                       const at::Tensor& reward_sum, const at::Tensor& first_seen, const at::Tensor& last_seen,
                       at::IntArrayRef level_sizes, const at::Tensor& paths, const at::Tensor& rewards,
                       int64_t step, int64_t max_depth, int64_t num_experts);

TrieArrays routing_update_cpu(const at::Tensor& parent, const at::Tensor& expert, const at::Tensor& count,
                              const at::Tensor& reward_sum, const at::Tensor& first_seen,
                              const at::Tensor& last_seen, at::IntArrayRef level_sizes, const at::Tensor& paths,
                              const at::Tensor& rewards, int64_t step, int64_t max_depth, int64_t num_experts,
                              bool suffix);

#ifdef MEMTRACE_WITH_CUDA
// The registered CUDA kernel. It is compiled by the host compiler (routing_trie_cpu.cpp): it checks
// the arguments, runs routing_update_cuda_run and raises for whatever that reports.
TrieArrays routing_update_cuda(const at::Tensor& parent, const at::Tensor& expert, const at::Tensor& count,
                               const at::Tensor& reward_sum, const at::Tensor& first_seen,
                               const at::Tensor& last_seen, at::IntArrayRef level_sizes, const at::Tensor& paths,
                               const at::Tensor& rewards, int64_t step, int64_t max_depth, int64_t num_experts,
                               bool suffix);

// What the nvcc-compiled update reports instead of raising. No error for bad input is thrown in or
// through routing_trie_cuda.cu: such a throw (first from the .cu code, then from a host-compiled
// helper that it called) took the process down with SIGSEGV on the H100, while the same errors
// raised cleanly from the CPU kernel. So the .cu code stops, returns, and routing_update_cuda raises.
struct CudaUpdateResult {
  enum Error : int { kOk = 0, kBadPaths, kBadNodes, kTooManyNodes };
  Error error = kOk;
  int64_t bad = 0;    // kBadPaths, kBadNodes: how many path entries or trie nodes failed the checks
  int64_t depth = 0;  // kBadNodes: the depth (1-based) of the level that failed
  TrieArrays arrays;  // the new trie, where error == kOk
};

// The device half of routing_update_cuda, for arguments it has checked (check_update_args, CUDA
// tensors, N * starts below 2^31). It may still throw for a CUDA or allocation failure, never for
// the values held in the tensors.
CudaUpdateResult routing_update_cuda_run(const at::Tensor& parent, const at::Tensor& expert,
                                         const at::Tensor& count, const at::Tensor& reward_sum,
                                         const at::Tensor& first_seen, const at::Tensor& last_seen,
                                         at::IntArrayRef level_sizes, const at::Tensor& paths,
                                         const at::Tensor& rewards, int64_t step, int64_t max_depth,
                                         int64_t num_experts, bool suffix);
#endif

}  // namespace memtrace

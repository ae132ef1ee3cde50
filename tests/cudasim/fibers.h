// The CPU stand-in for a CUDA device: each thread of a block is a cooperative fiber.
//
// A launch runs its blocks one after another on the calling OS thread. Within a block every CUDA
// thread is a fiber with its own stack (guard page below it); a fiber runs until it reaches
// __syncthreads, a warp shuffle, or its end, and the scheduler then picks the next ready fiber in
// the launch's order (first-in-first-out, last-in-first-out, or seeded random). So the code between
// two barriers runs in a different interleaving per order, which is what exposes a missing barrier.
//
// * __syncthreads is a true block barrier: it releases when every thread of the block waits at the
//   same one. Threads waiting at different barriers, or some waiting while others exited, is a
//   deadlock on a GPU; here it is reported (which threads wait where) instead of hanging.
// * __shfl_*_sync is a warp rendezvous: every lane of the mask must arrive at the same shuffle, with
//   the same mask; out-of-range lanes keep their own value, a lane outside the mask gives garbage.
// * __shared__ variables (rewritten by tests/cudasim/rewrite.py) start as garbage (all bits set: a
//   NaN for float and double) in every block.
// * A fault (null pointer, read past an argument's end, stack overflow) ends the launch with an
//   error instead of the process.
#pragma once

#include <math.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <new>
#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <random>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SANITIZE_THREAD__)
#define NKSIM_TSAN 1
extern "C" {
void* __tsan_get_current_fiber(void);
void* __tsan_create_fiber(unsigned flags);
void __tsan_switch_to_fiber(void* fiber, unsigned flags);
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
void __tsan_ignore_thread_begin(void);
void __tsan_ignore_thread_end(void);
}
// The runtime's own bookkeeping is not part of the kernel's memory model: TSan must not see it.
#define NKSIM_UNSANITIZED __attribute__((no_sanitize("thread")))
#define NKSIM_RUNTIME NKSIM_UNSANITIZED __attribute__((noinline))
#else
#define NKSIM_TSAN 0
#define NKSIM_UNSANITIZED
#define NKSIM_RUNTIME inline
#endif

#if !defined(__x86_64__) || defined(NKSIM_UCONTEXT) || defined(__SANITIZE_ADDRESS__)
#include <ucontext.h>
#define NKSIM_USE_UCONTEXT 1
#else
#define NKSIM_USE_UCONTEXT 0
// Save the callee-saved registers and the FP control words on the current stack, store its pointer
// in *save, switch to the stack `load` and restore the same from it (System V x86-64).
asm(R"(
.text
.p2align 4
.globl nksim_switch
.hidden nksim_switch
.type nksim_switch,@function
nksim_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
.size nksim_switch,.-nksim_switch
)");
extern "C" void nksim_switch(void** save, void* load);
#endif

namespace nksim {

struct dim3 {
    unsigned int x, y, z;
};

enum class Order : int { fifo = 0, lifo = 1, random = 2 };
enum class State : unsigned char { ready, barrier, shuffle, done };

#ifndef NKSIM_STACK_BYTES
#define NKSIM_STACK_BYTES (64 * 1024)
#endif

struct Thread {
#if NKSIM_USE_UCONTEXT
    ucontext_t context;
#else
    void* sp;
#endif
    dim3 idx;
    int linear;
    State state;
    int line;  // the source line it waits at
    unsigned char* stack;
    // Warp shuffle operands and result.
    uint64_t value, result;
    int delta, width;
    unsigned mask;
#if NKSIM_TSAN
    void* tsan_fiber;
#endif
};

struct Warp {
    unsigned arrived, mask;
    int line;
};

struct Launch {
    dim3 grid{}, block{}, block_idx{};
    void (*entry)(void* const*) = nullptr;
    void* const* argv = nullptr;
    Order order = Order::fifo;
    std::mt19937_64 rng;
    std::vector<Thread> threads;
    std::vector<unsigned char*> stacks;  // a pool, reused by every launch
    std::vector<int> ready_storage;
    int* ready = nullptr;  // a ring of the ready threads (raw: the runtime's accesses stay uninstrumented)
    int ready_head = 0, ready_count = 0;
    Warp warps[32]{};
    int nthreads = 0;
    uint64_t epoch = 0;  // one per block: __shared__ variables are fresh garbage in each
    bool failed = false;
    char* err = nullptr;
    size_t errlen = 0;
#if NKSIM_USE_UCONTEXT
    ucontext_t scheduler;
#else
    void* scheduler_sp = nullptr;
#endif
#if NKSIM_TSAN
    void* tsan_scheduler = nullptr;
    // Happens-before as a GPU gives it: launch -> threads -> end (and block -> next block, as their
    // __shared__ storage is one here); a barrier's arrivals -> its departures
    // (one token per barrier parity, so a thread already past the next barrier passes nothing back).
    char launch_token = 0, end_token = 0, barrier_tokens[2]{};
    uint64_t barrier_generation = 0;
#endif
};

inline Launch g;
inline Thread* g_current = nullptr;

NKSIM_RUNTIME void vfail(const char* fmt, va_list ap) {
    if (g.failed) return;
    g.failed = true;
    int used = snprintf(g.err, g.errlen, "block (%u, %u, %u): ", g.block_idx.x, g.block_idx.y, g.block_idx.z);
    if (used >= 0 && (size_t)used < g.errlen) vsnprintf(g.err + used, g.errlen - used, fmt, ap);
}

NKSIM_RUNTIME void fail(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vfail(fmt, ap);
    va_end(ap);
}

// ----------------------------------------------------------------- context switches
NKSIM_RUNTIME void to_scheduler() {
    Thread* t = g_current;
#if NKSIM_TSAN
    __tsan_switch_to_fiber(g.tsan_scheduler, 1 /* no synchronization */);
#endif
#if NKSIM_USE_UCONTEXT
    swapcontext(&t->context, &g.scheduler);
#else
    nksim_switch(&t->sp, g.scheduler_sp);
#endif
}

NKSIM_RUNTIME void resume(int i) {
    Thread* t = &g.threads[i];
    g_current = t;
#if NKSIM_TSAN
    __tsan_switch_to_fiber(t->tsan_fiber, 1);
#endif
#if NKSIM_USE_UCONTEXT
    swapcontext(&g.scheduler, &t->context);
#else
    nksim_switch(&g.scheduler_sp, t->sp);
#endif
    g_current = nullptr;
}

NKSIM_RUNTIME void thread_body() {
#if NKSIM_TSAN
    __tsan_acquire(&g.launch_token);
#endif
    g.entry(g.argv);
    g_current->state = State::done;
#if NKSIM_TSAN
    __tsan_release(&g.end_token);
#endif
    to_scheduler();
    abort();  // a finished thread is never resumed
}

#if NKSIM_USE_UCONTEXT
inline void thread_entry() { thread_body(); }
#else
extern "C" inline void nksim_thread_entry() { thread_body(); }
#endif

NKSIM_RUNTIME unsigned char* stack_for(int i) {
    while ((int)g.stacks.size() <= i) {
        const size_t page = (size_t)sysconf(_SC_PAGESIZE);
        void* mem = mmap(nullptr, NKSIM_STACK_BYTES + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (mem == MAP_FAILED) return nullptr;
        mprotect(mem, page, PROT_NONE);  // guard page: an overflow faults instead of corrupting
        g.stacks.push_back((unsigned char*)mem + page);
    }
    return g.stacks[i];
}

NKSIM_RUNTIME bool start_thread(Thread& t) {
    t.stack = stack_for(t.linear);
    if (!t.stack) return false;
#if NKSIM_USE_UCONTEXT
    getcontext(&t.context);
    t.context.uc_stack.ss_sp = t.stack;
    t.context.uc_stack.ss_size = NKSIM_STACK_BYTES;
    t.context.uc_link = nullptr;
    makecontext(&t.context, thread_entry, 0);
#else
    uintptr_t* sp = (uintptr_t*)(((uintptr_t)t.stack + NKSIM_STACK_BYTES) & ~(uintptr_t)15);
    *--sp = 0;                                // the entry's return address: it never returns
    *--sp = (uintptr_t)&nksim_thread_entry;   // where nksim_switch's `ret` goes
    for (int r = 0; r < 6; ++r) *--sp = 0;    // rbp, rbx, r12-r15
    *--sp = 0x1F80u | (0x037Full << 32);      // default MXCSR and x87 control word
    t.sp = sp;
#endif
#if NKSIM_TSAN
    // One TSan fiber per thread slot, kept across blocks and launches (creating one costs system calls);
    // blocks are ordered for TSan anyway.
    static std::vector<void*> fibers;
    while ((int)fibers.size() <= t.linear) fibers.push_back(__tsan_create_fiber(0));
    t.tsan_fiber = fibers[t.linear];
#endif
    return true;
}

// ----------------------------------------------------------------- scheduling
NKSIM_RUNTIME void make_ready(int i) {
    g.ready[(g.ready_head + g.ready_count++) % g.nthreads] = i;
}

NKSIM_RUNTIME int pick() {
    int i;
    if (g.order == Order::fifo) {
        i = g.ready[g.ready_head];
        g.ready_head = (g.ready_head + 1) % g.nthreads;
        --g.ready_count;
    } else if (g.order == Order::lifo) {
        i = g.ready[(g.ready_head + --g.ready_count) % g.nthreads];
    } else {
        int* slot = &g.ready[(g.ready_head + (int)(g.rng() % (uint64_t)g.ready_count)) % g.nthreads];
        i = *slot;
        *slot = g.ready[(g.ready_head + --g.ready_count) % g.nthreads];
    }
    return i;
}

NKSIM_RUNTIME void describe_waits(const char* what) {
    // Group the threads by where they are: "threads 0-31 wait at line 273; threads 32-255 exited".
    char buf[1024];
    size_t used = 0;
    auto where = [](const Thread& t, char* out, size_t n) {
        if (t.state == State::done) return snprintf(out, n, "exited");
        return snprintf(out, n, "%s at line %d", t.state == State::barrier ? "wait at __syncthreads" : "wait at a warp shuffle",
                        t.line);
    };
    int start = 0;
    for (int i = 1; i <= g.nthreads && used < sizeof buf - 1; ++i) {
        const bool same = i < g.nthreads && g.threads[i].state == g.threads[start].state &&
                          (g.threads[i].state == State::done || g.threads[i].line == g.threads[start].line);
        if (same) continue;
        char w[96];
        where(g.threads[start], w, sizeof w);
        const int n = snprintf(buf + used, sizeof buf - used, "%sthreads %d-%d %s", used ? "; " : "", start, i - 1, w);
        if (n > 0) used = std::min(used + (size_t)n, sizeof buf - 1);  // truncated past the buffer
        start = i;
    }
    fail("%s: %s", what, buf);
}

// Run one block to its end; false on a deadlock or an error the kernel code raised.
NKSIM_RUNTIME bool run_block() {
    ++g.epoch;
    g.ready_head = g.ready_count = 0;
    for (auto& w : g.warps) w = Warp{};
    for (int i = 0; i < g.nthreads; ++i) {
        Thread& t = g.threads[i];
        t.state = State::ready;
        if (!start_thread(t)) {
            fail("out of memory for thread stacks");
            return false;
        }
        make_ready(i);
    }
    bool ok = true;
    for (;;) {
        while (g.ready_count && !g.failed) resume(pick());
        if (g.failed) {
            ok = false;
            break;
        }
        int done = 0, at_barrier = 0;
        for (int i = 0; i < g.nthreads; ++i) {
            const Thread& t = g.threads[i];
            done += t.state == State::done;
            at_barrier += t.state == State::barrier && t.line == g.threads[0].line;
        }
        if (done == g.nthreads) break;
        if (at_barrier == g.nthreads) {  // every thread at the same barrier: release it
#if NKSIM_TSAN
            ++g.barrier_generation;
#endif
            for (int i = 0; i < g.nthreads; ++i) {
                g.threads[i].state = State::ready;
                make_ready(i);
            }
            continue;
        }
        describe_waits("deadlock");
        ok = false;
        break;
    }
    return ok;
}

// ----------------------------------------------------------------- what kernels call
NKSIM_RUNTIME void syncthreads(int line) {
    Thread* t = g_current;
    t->state = State::barrier;
    t->line = line;
#if NKSIM_TSAN
    char* token = &g.barrier_tokens[g.barrier_generation & 1];
    __tsan_release(token);
#endif
    to_scheduler();
#if NKSIM_TSAN
    __tsan_acquire(token);
#endif
}

// Lane `lane` of a warp segment of `width` reads lane `src` (computed by the caller's op).
NKSIM_RUNTIME uint64_t shuffle(int line, unsigned mask, uint64_t value, int delta, int width) {
    Thread* t = g_current;
    const int lane = t->linear & 31, w = t->linear >> 5;
    const int lanes = g.nthreads - w * 32 < 32 ? g.nthreads - w * 32 : 32;
    const unsigned present = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1);
    if (!(mask >> lane & 1u)) {
        fail("thread %d: __shfl_down_sync at line %d with mask 0x%08x that leaves out its own lane %d", t->linear, line,
             mask, lane);
    } else if (mask & ~present) {
        fail("thread %d: __shfl_down_sync at line %d: mask 0x%08x names lanes the block does not have", t->linear, line,
             mask);
    } else if (width < 1 || width > 32 || (width & (width - 1))) {
        fail("thread %d: __shfl_down_sync at line %d: width %d is not a power of two up to 32", t->linear, line, width);
    }
    Warp& W = g.warps[w];
    if (!g.failed && W.arrived && (W.mask != mask || W.line != line)) {
        fail("warp %d: lanes meet at different shuffles (line %d mask 0x%08x, line %d mask 0x%08x)", w, W.line, W.mask,
             line, mask);
    }
    if (g.failed) {
        to_scheduler();
        abort();
    }
    W.mask = mask;
    W.line = line;
    W.arrived |= 1u << lane;
    t->value = value;
    t->delta = delta;
    t->width = width;
    t->state = State::shuffle;
    t->line = line;
    if (W.arrived == mask) {  // the last lane in: every lane's result, then all continue
        for (int l = 0; l < 32; ++l) {
            if (!(mask >> l & 1u)) continue;
            Thread& u = g.threads[w * 32 + l];
            const int base = l & ~(u.width - 1), src = l + u.delta;
            if (u.delta < 0 || src >= base + u.width) {
                u.result = u.value;  // out of range: the lane keeps its own value
            } else if (!(mask >> src & 1u)) {
                u.result = ~0ull;  // an inactive source lane: undefined on a GPU
            } else {
                u.result = g.threads[w * 32 + src].value;
            }
            u.state = State::ready;
            make_ready(w * 32 + l);
        }
        W.arrived = 0;
    }
    to_scheduler();  // (no happens-before between lanes: a shuffle orders no memory, __syncwarp would)
    return t->result;
}

template <typename T> inline T shfl_down_sync(int line, unsigned mask, T var, unsigned delta, int width = 32) {
    static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffles move up to 8 bytes");
    uint64_t bits = 0;
    memcpy(&bits, &var, sizeof(T));
    bits = shuffle(line, mask, bits, (int)delta, width);
    T out;
    memcpy(&out, &bits, sizeof(T));
    return out;
}

NKSIM_RUNTIME dim3 thread_idx() { return g_current->idx; }
NKSIM_RUNTIME dim3 block_idx() { return g.block_idx; }
NKSIM_RUNTIME dim3 block_dim() { return g.block; }
NKSIM_RUNTIME dim3 grid_dim() { return g.grid; }
NKSIM_RUNTIME uint64_t block_epoch() { return g.epoch; }

// A __shared__ variable: storage shared by the block's threads, garbage at the start of each block.
template <typename T> struct SharedSlot {
    alignas(T) unsigned char bytes[sizeof(T)];
    uint64_t epoch;

    NKSIM_RUNTIME T& get() {
        const uint64_t now = block_epoch();
        if (epoch != now) {
#if NKSIM_TSAN
            __tsan_ignore_thread_begin();  // the garbage is the runtime's write, not the kernel's
#endif
            memset(bytes, 0xFF, sizeof bytes);
            epoch = now;
#if NKSIM_TSAN
            __tsan_ignore_thread_end();
#endif
        }
        return *std::launder(reinterpret_cast<T*>(bytes));
    }
};

// ----------------------------------------------------------------- faults
inline sigjmp_buf g_fault_jump;
inline volatile uintptr_t g_fault_address = 0;
inline volatile int g_fault_signal = 0;

inline void on_fault(int sig, siginfo_t* info, void*) {
    g_fault_signal = sig;
    g_fault_address = (uintptr_t)info->si_addr;
    siglongjmp(g_fault_jump, 1);
}

}  // namespace nksim

// ----------------------------------------------------------------- the loader's entry points
namespace nksim {
template <typename... Args, size_t... I>
inline void call_kernel_impl(void (*f)(Args...), void* const* argv, std::index_sequence<I...>) {
    f(*static_cast<std::remove_reference_t<Args>*>(argv[I])...);
}
template <typename... Args> inline void call_kernel(void (*f)(Args...), void* const* argv) {
    call_kernel_impl(f, argv, std::index_sequence_for<Args...>{});
}
}  // namespace nksim

#define NKSIM_ENTRY(name) \
    extern "C" __attribute__((visibility("default"))) void nksim_entry_##name(void* const* argv) { ::nksim::call_kernel(&name, argv); }

// Runs entry(argv) on a grid; 0 on success, 1 with a message in err, 2 on a fault (*fault_address).
extern "C" __attribute__((visibility("default"))) NKSIM_UNSANITIZED int nksim_launch(
    void (*entry)(void* const*), void* const* argv, const unsigned* grid, const unsigned* block, int order,
    unsigned long long seed, char* err, size_t errlen, unsigned long long* fault_address) {
    using namespace nksim;
    static std::mutex one_at_a_time;
    std::lock_guard<std::mutex> lock(one_at_a_time);
    g.err = err;
    g.errlen = errlen;
    g.failed = false;
    err[0] = 0;
    g.grid = {grid[0], grid[1], grid[2]};
    g.block = {block[0], block[1], block[2]};
    const unsigned long long threads = (unsigned long long)block[0] * block[1] * block[2];
    if (!grid[0] || !grid[1] || !grid[2] || !threads) return fail("empty grid or block"), 1;
    if (threads > 1024 || block[2] > 64) return fail("block (%u, %u, %u) exceeds CUDA's limits", block[0], block[1], block[2]), 1;
    if (grid[1] > 65535 || grid[2] > 65535 || grid[0] > 2147483647u)
        return fail("grid (%u, %u, %u) exceeds CUDA's limits", grid[0], grid[1], grid[2]), 1;
    g.entry = entry;
    g.argv = argv;
    g.order = (Order)order;
    g.rng.seed(seed);
    g.nthreads = (int)threads;
    g.threads.assign(g.nthreads, Thread{});
    g.ready_storage.assign(g.nthreads, 0);
    g.ready = g.ready_storage.data();
    for (int i = 0; i < g.nthreads; ++i) {
        Thread& t = g.threads[i];
        t.linear = i;
        t.idx = {i % block[0], (i / block[0]) % block[1], i / (block[0] * block[1])};
    }
    // Blocks run in the launch's order too: nothing may depend on another block having run.
    const unsigned long long blocks = (unsigned long long)grid[0] * grid[1] * grid[2];
    std::vector<unsigned long long> sequence(blocks);
    for (unsigned long long b = 0; b < blocks; ++b) sequence[b] = g.order == Order::lifo ? blocks - 1 - b : b;
    if (g.order == Order::random) std::shuffle(sequence.begin(), sequence.end(), g.rng);

    static unsigned char alt_stack[64 * 1024];
    stack_t alt{}, old_alt{};
    alt.ss_sp = alt_stack;
    alt.ss_size = sizeof alt_stack;
    struct sigaction action {}, old_segv{}, old_bus{};
    action.sa_sigaction = on_fault;
    action.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&action.sa_mask);
    sigaltstack(&alt, &old_alt);
    sigaction(SIGSEGV, &action, &old_segv);
    sigaction(SIGBUS, &action, &old_bus);
#if NKSIM_TSAN
    g.tsan_scheduler = __tsan_get_current_fiber();
    __tsan_release(&g.launch_token);
#endif
    int rc = 0;
    if (sigsetjmp(g_fault_jump, 1)) {
#if NKSIM_TSAN
        __tsan_switch_to_fiber(g.tsan_scheduler, 1);
#endif
        g_current = nullptr;
        *fault_address = g_fault_address;
        fail("%s at address 0x%llx", g_fault_signal == SIGBUS ? "SIGBUS" : "SIGSEGV", (unsigned long long)g_fault_address);
        rc = 2;
    } else {
        for (unsigned long long b : sequence) {
            g.block_idx = {(unsigned)(b % grid[0]), (unsigned)(b / grid[0] % grid[1]), (unsigned)(b / grid[0] / grid[1])};
            if (!run_block()) {
                rc = 1;
                break;
            }
#if NKSIM_TSAN
            // Each block's __shared__ storage is the same memory here, not on a GPU: order the blocks.
            __tsan_acquire(&g.end_token);
            __tsan_release(&g.launch_token);
#endif
        }
    }
#if NKSIM_TSAN
    __tsan_acquire(&g.end_token);
#endif
    sigaction(SIGSEGV, &old_segv, nullptr);
    sigaction(SIGBUS, &old_bus, nullptr);
    sigaltstack(&old_alt, nullptr);
    return rc;
}

// Memory whose end abuts an inaccessible page, so a read or write past it faults.
extern "C" __attribute__((visibility("default"))) void* nksim_guarded_alloc(size_t bytes, size_t* mapped) {
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    const size_t body = (bytes + page - 1) / page * page;
    void* mem = mmap(nullptr, body + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) return nullptr;
    mprotect((unsigned char*)mem + body, page, PROT_NONE);
    *mapped = body + page;
    return (unsigned char*)mem + body - bytes;
}

extern "C" __attribute__((visibility("default"))) void nksim_guarded_free(void* start, size_t bytes, size_t mapped) {
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    const size_t body = (bytes + page - 1) / page * page;
    munmap((unsigned char*)start + bytes - body, mapped);
}

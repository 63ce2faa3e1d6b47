/* A parallel-for whose caller never waits for a thread that is not running.
 *
 *   mdnn_parallel_for(ntasks, team, fn, ctx): runs fn(ctx, t, tid) for every task
 *   t < ntasks on up to `team` threads (the caller is tid 0, pool workers 1..team-1)
 *   and returns when every task has run.
 *
 * Why not OpenMP's parallel for: its join waits for every thread of the team to
 * arrive, so on a machine whose cores are shared with other processes each
 * parallel region costs a scheduler time slice (measured here: ~8 ms per layer
 * instead of microseconds) whenever one worker is descheduled. Here tasks are
 * claimed from a shared counter: the caller claims tasks too, a worker that wakes
 * late finds nothing left and goes back to sleep, and completion means "every task
 * done", not "every thread arrived". Each task is still computed by exactly one
 * thread, so results do not depend on which threads took part.
 *
 * The claim word packs (generation << 32 | next task). Publishing a job: the claim
 * word first gets the new generation with next = SENTINEL (nobody can claim), then
 * the job's fields are written, then (generation, 0) is stored with release order.
 * A worker claims with a compare-and-swap on the whole word, so a worker holding
 * fields of an older job can never claim a task of a newer one.
 *
 * Workers spin briefly (MDNN_SPIN_NS) before sleeping on a condition variable, so
 * back-to-back layers on an idle machine start without a wake-up, and a busy
 * machine is not burdened by spinning. One pool per process: every extension module
 * compiles this header, and the first one imported shares its pool with the others
 * (parallel.pxi sets mdnn_pool_p; with a pool per module, the workers of the module
 * that ran the last layer spun on a core while the next module's team needed it: on
 * 2 cores, MobileNet-v2 alternating conv and depthwise layers lost ~25% to it). One
 * job at a time; a second caller that finds the pool busy runs its tasks itself.
 * After fork() the child's pool starts empty (pthread_atfork). */
#ifndef MINIDNN_PARALLEL_H
#define MINIDNN_PARALLEL_H

#include <pthread.h>
#include <stdint.h>
#include <time.h>
#include <sched.h>

#define MDNN_POOL_MAX 256
#define MDNN_POOL_CAPSULE "minidnn.parallel_pool"
#define MDNN_SENTINEL 0xFFFFFFFFu
#define MDNN_SPIN_NS 50000L            /* 50 us of spinning before a worker sleeps */

typedef void (*mdnn_task_fn)(void* ctx, long task, int tid);

typedef struct {
    pthread_mutex_t job_lock;          /* one caller at a time (trylock) */
    pthread_mutex_t m;                 /* wake-ups */
    pthread_cond_t cv;
    int nworkers;
    int sleepers;                      /* workers waiting on cv (under m) */
    uint64_t claim;                    /* (generation << 32) | next task */
    long done;                         /* tasks finished in this generation */
    /* the job of the current generation */
    mdnn_task_fn fn;
    void* ctx;
    long ntasks;
    int team;
    int forked;
} mdnn_pool_t;

static mdnn_pool_t mdnn_pool_local = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER,
                                      PTHREAD_COND_INITIALIZER, 0, 0, 0, 0, 0, 0, 0, 0, 0};
/* the process's pool: this module's own until parallel.pxi points it at the shared one
 * (before any worker exists) */
static mdnn_pool_t* mdnn_pool_p = &mdnn_pool_local;

static inline long mdnn_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

static inline void mdnn_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Claim and run tasks of generation `gen` as thread `tid` until none is left. */
static inline void mdnn_pool_work(mdnn_pool_t* p, uint32_t gen, int tid)
{
    for (;;) {
        uint64_t w = __atomic_load_n(&p->claim, __ATOMIC_ACQUIRE);
        uint32_t g = (uint32_t)(w >> 32), i = (uint32_t)w;
        mdnn_task_fn fn;
        void* ctx;
        long n;
        if (g != gen || i == MDNN_SENTINEL)
            return;
        fn = p->fn;
        ctx = p->ctx;
        n = p->ntasks;
        if ((long)i >= n)
            return;
        if (!__atomic_compare_exchange_n(&p->claim, &w, w + 1, 0, __ATOMIC_ACQ_REL,
                                         __ATOMIC_ACQUIRE))
            continue;
        fn(ctx, (long)i, tid);
        __atomic_add_fetch(&p->done, 1, __ATOMIC_RELEASE);
    }
}

static void* mdnn_pool_worker(void* arg)
{
    mdnn_pool_t* p = mdnn_pool_p;
    int id = (int)(intptr_t)arg;
    uint32_t seen = (uint32_t)(__atomic_load_n(&p->claim, __ATOMIC_ACQUIRE) >> 32);
    for (;;) {
        uint32_t gen;
        long t0 = mdnn_now_ns();
        int spins = 0;
        for (;;) {                     /* wait for a new generation: spin, then sleep */
            uint64_t w = __atomic_load_n(&p->claim, __ATOMIC_ACQUIRE);
            gen = (uint32_t)(w >> 32);
            if (gen != seen && (uint32_t)w != MDNN_SENTINEL)
                break;
            if (++spins < 64 || mdnn_now_ns() - t0 < MDNN_SPIN_NS) {
                mdnn_relax();
                continue;
            }
            pthread_mutex_lock(&p->m);
            __atomic_add_fetch(&p->sleepers, 1, __ATOMIC_SEQ_CST);
            while ((uint32_t)(__atomic_load_n(&p->claim, __ATOMIC_SEQ_CST) >> 32) == seen)
                pthread_cond_wait(&p->cv, &p->m);
            __atomic_sub_fetch(&p->sleepers, 1, __ATOMIC_SEQ_CST);
            pthread_mutex_unlock(&p->m);
            t0 = mdnn_now_ns();
            spins = 0;
        }
        seen = gen;
        if (id < __atomic_load_n(&p->team, __ATOMIC_ACQUIRE))
            mdnn_pool_work(p, gen, id);
    }
    return NULL;
}

static void mdnn_pool_atfork_child(void)
{
    /* the workers do not exist in the child: start over */
    pthread_mutex_t m0 = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t c0 = PTHREAD_COND_INITIALIZER;
    mdnn_pool_p->job_lock = m0;
    mdnn_pool_p->m = m0;
    mdnn_pool_p->cv = c0;
    mdnn_pool_p->nworkers = 0;
    mdnn_pool_p->sleepers = 0;
}

/* Make sure the pool has at least n - 1 workers (under job_lock). */
static void mdnn_pool_grow(mdnn_pool_t* p, int n)
{
    pthread_attr_t attr;
    if (!p->forked) {
        pthread_atfork(NULL, NULL, mdnn_pool_atfork_child);
        p->forked = 1;
    }
    if (n > MDNN_POOL_MAX)
        n = MDNN_POOL_MAX;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    while (p->nworkers < n - 1) {
        pthread_t t;
        if (pthread_create(&t, &attr, mdnn_pool_worker, (void*)(intptr_t)(p->nworkers + 1)) != 0)
            break;                     /* fewer threads: the tasks still all run */
        p->nworkers++;
    }
    pthread_attr_destroy(&attr);
}

/* Run fn(ctx, t, tid) for t < ntasks on up to `team` threads; tid < team. */
static void mdnn_parallel_for(long ntasks, int team, mdnn_task_fn fn, void* ctx)
{
    mdnn_pool_t* p = mdnn_pool_p;
    uint32_t gen;
    long t;
    if (team > ntasks)
        team = (int)ntasks;
    if (team <= 1 || ntasks <= 1 || pthread_mutex_trylock(&p->job_lock) != 0) {
        for (t = 0; t < ntasks; t++)
            fn(ctx, t, 0);
        return;
    }
    mdnn_pool_grow(p, team);
    if (team > p->nworkers + 1)
        team = p->nworkers + 1;
    gen = (uint32_t)(__atomic_load_n(&p->claim, __ATOMIC_ACQUIRE) >> 32) + 1;
    __atomic_store_n(&p->claim, ((uint64_t)gen << 32) | MDNN_SENTINEL, __ATOMIC_RELEASE);
    p->fn = fn;
    p->ctx = ctx;
    p->ntasks = ntasks;
    __atomic_store_n(&p->team, team, __ATOMIC_RELEASE);
    __atomic_store_n(&p->done, 0, __ATOMIC_RELEASE);
    __atomic_store_n(&p->claim, (uint64_t)gen << 32, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&p->sleepers, __ATOMIC_SEQ_CST) > 0) {   /* pairs with the worker's check */
        pthread_mutex_lock(&p->m);
        pthread_cond_broadcast(&p->cv);
        pthread_mutex_unlock(&p->m);
    }
    mdnn_pool_work(p, gen, 0);
    /* every task is claimed; wait for the ones still running elsewhere */
    {
        int spins = 0;
        while (__atomic_load_n(&p->done, __ATOMIC_ACQUIRE) < ntasks) {
            if (++spins < 2000)
                mdnn_relax();
            else
                sched_yield();
        }
    }
    pthread_mutex_unlock(&p->job_lock);
}

#endif

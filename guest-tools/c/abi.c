/*
 * abi - checks process semantics a correct syscall layer must reproduce exactly, printing
 * one "CASE=RESULT" line per case. The same binary run natively and under assure-vmm must
 * print the same lines.
 *
 *   abi mm       mprotect/munmap take effect at once (stale translations must not survive)
 *   abi fork     fork/wait statuses and copy-on-write memory
 *   abi signals  handlers with siginfo, the saved context and SSE state, sigaltstack
 *   abi demand   64 MiB touched page by page (demand faults), brk growth and shrink
 *   abi threads  pthreads: mutex, condition variable, join, TLS, a signal to one thread
 *   abi wait-term  prints "ready", waits in sigsuspend for SIGTERM, exits 0 from its handler
 */
#define _GNU_SOURCE
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static sigjmp_buf env;
static volatile int faults;
static volatile int last_code;

static void on_segv(int sig, siginfo_t *si, void *uc)
{
	(void)sig;
	(void)uc;
	faults++;
	last_code = si->si_code;
	siglongjmp(env, 1);
}

static void catch_segv(void)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_sigaction = on_segv;
	sa.sa_flags = SA_SIGINFO | SA_NODEFER;
	sigaction(SIGSEGV, &sa, NULL);
}

static int mm(void)
{
	catch_segv();
	char *p = mmap(NULL, 4 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		return 1;
	p[0] = 1;
	p[4096] = 2;
	p[8192] = 3;
	if (!sigsetjmp(env, 1)) {
		mprotect(p, 4096, PROT_READ);
		p[0] = 5;
	}
	printf("mm.write_after_mprotect_ro faults=%d code=%d value=%d\n", faults, last_code, p[0]);
	if (!sigsetjmp(env, 1)) {
		munmap(p + 4096, 4096);
		*(volatile char *)(p + 4096);
	}
	printf("mm.read_after_munmap faults=%d code=%d\n", faults, last_code);
	if (!sigsetjmp(env, 1)) {
		mprotect(p + 8192, 4096, PROT_NONE);
		*(volatile char *)(p + 8192);
	}
	printf("mm.read_prot_none faults=%d code=%d\n", faults, last_code);
	mprotect(p + 8192, 4096, PROT_READ | PROT_WRITE);
	printf("mm.contents_survive_prot_none=%d\n", p[8192]);
	mprotect(p, 4096, PROT_READ | PROT_WRITE);
	p[0] = 7;
	printf("mm.writable_again=%d\n", p[0]);
	/* mremap moves pages: the old address must fault, the new one hold the data. */
	char *q = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	q[10] = 42;
	/* Whatever lies above q (a neighbour, or a blocker we place), growth must move it. */
	mmap(q + 4096, 4096, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
	char *r = mremap(q, 4096, 3 * 4096, MREMAP_MAYMOVE);
	printf("mm.mremap_moved=%d data=%d\n", r != q, r[10]);
	if (!sigsetjmp(env, 1))
		*(volatile char *)(q + 10);
	printf("mm.old_address_faults=%d\n", faults);
	return 0;
}

static int forks(void)
{
	static int shared_value = 1;
	for (int i = 0; i < 3; i++) {
		fflush(stdout);
		pid_t p = fork();
		if (p == 0) {
			shared_value = 100 + i;
			if (i == 2)
				abort();
			_exit(10 + i);
		}
		int st = 0;
		pid_t w = waitpid(p, &st, 0);
		printf("fork.%d waited=%d exited=%d code=%d signaled=%d sig=%d parent_value=%d\n", i, w == p,
		       WIFEXITED(st), WIFEXITED(st) ? WEXITSTATUS(st) : -1, WIFSIGNALED(st),
		       WIFSIGNALED(st) ? WTERMSIG(st) : -1, shared_value);
	}
	printf("fork.no_more_children=%d\n", waitpid(-1, NULL, WNOHANG) == -1);
	return 0;
}

static volatile int traps;
static volatile uintptr_t trap_rip_ok;
static volatile int on_alt;
static char altstack[65536];

static void on_trap(int sig, siginfo_t *si, void *ucv)
{
	ucontext_t *uc = ucv;
	(void)sig;
	traps++;
	trap_rip_ok = si->si_code == 0x80 && uc->uc_mcontext.gregs[REG_RIP] != 0;
	char here;
	on_alt = (uintptr_t)&here >= (uintptr_t)altstack && (uintptr_t)&here < (uintptr_t)altstack + sizeof altstack;
	/* Clobber SSE state: the interrupted code must get its own back. */
	volatile double x = 3.25;
	x = x * x;
	(void)x;
}

static volatile int usr2_count;

static void on_usr2(int sig)
{
	(void)sig;
	usr2_count++;
}

/* ppoll's mask holds for the wait only: a blocked, pending signal is taken during it and
 * ends it with EINTR, and the mask is back afterwards. */
static void ppoll_mask(void)
{
	sigset_t b, empty, cur;
	sigemptyset(&b);
	sigaddset(&b, SIGUSR2);
	sigemptyset(&empty);
	sigprocmask(SIG_BLOCK, &b, NULL);
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_usr2;
	sigaction(SIGUSR2, &sa, NULL);
	struct timespec short_wait = { 0, 10000000 };
	int r0 = ppoll(NULL, 0, &short_wait, &empty);
	raise(SIGUSR2);
	int before = usr2_count;
	struct timespec long_wait = { 5, 0 };
	int r = ppoll(NULL, 0, &long_wait, &empty);
	int e = errno;
	sigprocmask(SIG_BLOCK, NULL, &cur);
	printf("signals.ppoll_timeout=%d ppoll_signal=%d eintr=%d handled=%d blocked_again=%d\n", r0, r, e == EINTR,
	       usr2_count - before, sigismember(&cur, SIGUSR2));
}

static int signals(void)
{
	stack_t ss = { .ss_sp = altstack, .ss_size = sizeof altstack, .ss_flags = 0 };
	sigaltstack(&ss, NULL);
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_sigaction = on_trap;
	sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
	sigaction(SIGTRAP, &sa, NULL);
	double acc = 1.0;
	for (int i = 0; i < 5; i++) {
		acc *= 1.5;
		__asm__ volatile("int3");
	}
	printf("signals.traps=%d rip_ok=%d on_altstack=%d acc=%.4f\n", traps, (int)trap_rip_ok, on_alt, acc);
	/* raise() with a handler, then a blocked signal delivered on unblock. */
	sigset_t set;
	sigemptyset(&set);
	sigaddset(&set, SIGTRAP);
	sigprocmask(SIG_BLOCK, &set, NULL);
	raise(SIGTRAP);
	printf("signals.blocked_pending=%d\n", traps);
	sigprocmask(SIG_UNBLOCK, &set, NULL);
	printf("signals.delivered_on_unblock=%d\n", traps);
	signal(SIGUSR1, SIG_IGN);
	raise(SIGUSR1);
	printf("signals.ignored_survives=1\n");
	ppoll_mask();
	return 0;
}

static int demand(void)
{
	size_t sz = 64u << 20;
	char *p = mmap(NULL, sz, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	unsigned long sum = 0;
	for (size_t i = 0; i < sz; i += 4096)
		p[i] = (char)(i >> 12);
	for (size_t i = 0; i < sz; i += 4096)
		sum += (unsigned char)p[i];
	printf("demand.sum=%lu\n", sum);
	char *b0 = sbrk(0);
	sbrk(1 << 20);
	memset(b0, 7, 1 << 20);
	sbrk(-(1 << 20));
	printf("demand.brk_restored=%d\n", sbrk(0) == b0);
	return 0;
}

#define NTHREADS 4
#define ROUNDS 20000
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t turn_cv = PTHREAD_COND_INITIALIZER;
static long counter;
static int turn;
static __thread int tls_value;
static volatile pid_t usr1_tid;
static volatile pid_t worker_tid;

static void on_usr1(int sig)
{
	(void)sig;
	usr1_tid = (pid_t)syscall(SYS_gettid);
}

static pthread_mutex_t robust_lock;

static void *die_holding_lock(void *arg)
{
	(void)arg;
	pthread_mutex_lock(&robust_lock);
	return NULL; /* exits still holding it */
}

static volatile int thread_traps[NTHREADS];
static __thread int my_id;

static void on_thread_trap(int sig)
{
	(void)sig;
	thread_traps[my_id]++;
}

static void *worker(void *arg)
{
	int id = (int)(intptr_t)arg;
	tls_value = 1000 + id;
	my_id = id;
	/* Exceptions on every vCPU at once: demand faults on fresh pages and int3 traps. Each
	 * vCPU needs its own ring-0 stack for the exception frames. */
	size_t sz = 4u << 20;
	char *mem = mmap(NULL, sz, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	long touched = 0;
	for (size_t off = 0; off < sz; off += 4096) {
		mem[off] = (char)id;
		__asm__ volatile("int3");
		touched += mem[off] == (char)id;
	}
	munmap(mem, sz);
	if (touched != (long)(sz / 4096))
		return (void *)(intptr_t)-1;
	for (int i = 0; i < ROUNDS; i++) {
		pthread_mutex_lock(&lock);
		counter++;
		pthread_mutex_unlock(&lock);
	}
	/* Take turns in id order through a condition variable. */
	pthread_mutex_lock(&lock);
	while (turn != id)
		pthread_cond_wait(&turn_cv, &lock);
	turn++;
	pthread_cond_broadcast(&turn_cv);
	pthread_mutex_unlock(&lock);
	sched_yield();
	return (void *)(intptr_t)(tls_value * 2);
}

static void *sleeper(void *arg)
{
	(void)arg;
	worker_tid = (pid_t)syscall(SYS_gettid);
	while (!usr1_tid) {
		struct timespec ts = { 0, 1000000 };
		nanosleep(&ts, NULL);
	}
	return NULL;
}

static int threads(void)
{
	pthread_t t[NTHREADS];
	signal(SIGTRAP, on_thread_trap);
	for (int i = 0; i < NTHREADS; i++)
		pthread_create(&t[i], NULL, worker, (void *)(intptr_t)i);
	long sum = 0;
	for (int i = 0; i < NTHREADS; i++) {
		void *r;
		pthread_join(t[i], &r);
		sum += (long)(intptr_t)r;
	}
	printf("threads.counter=%ld expected=%d\n", counter, NTHREADS * ROUNDS);
	printf("threads.turns=%d joined_sum=%ld main_tls=%d\n", turn, sum, tls_value);
	for (int i = 0; i < NTHREADS; i++)
		printf("threads.traps[%d]=%d\n", i, thread_traps[i]);
	signal(SIGUSR1, on_usr1);
	pthread_t s;
	pthread_create(&s, NULL, sleeper, NULL);
	while (!worker_tid)
		sched_yield();
	pthread_kill(s, SIGUSR1);
	pthread_join(s, NULL);
	printf("threads.signal_reached_its_thread=%d\n", usr1_tid == worker_tid && usr1_tid != getpid());
	/* A robust mutex whose owner died: the next locker is told so. */
	pthread_mutexattr_t ma;
	pthread_mutexattr_init(&ma);
	pthread_mutexattr_setrobust(&ma, PTHREAD_MUTEX_ROBUST);
	pthread_mutex_init(&robust_lock, &ma);
	pthread_t d;
	pthread_create(&d, NULL, die_holding_lock, NULL);
	pthread_join(d, NULL);
	int r = pthread_mutex_lock(&robust_lock);
	printf("threads.robust_owner_died=%d consistent=%d\n", r == EOWNERDEAD, r == EOWNERDEAD && pthread_mutex_consistent(&robust_lock) == 0);
	return 0;
}

static volatile sig_atomic_t got_term;

static void on_term(int sig)
{
	(void)sig;
	got_term = 1;
}

static int wait_term(void)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_term;
	sigaction(SIGTERM, &sa, NULL);
	sigset_t block, old;
	sigemptyset(&block);
	sigaddset(&block, SIGTERM);
	sigprocmask(SIG_BLOCK, &block, &old);
	printf("ready\n");
	while (!got_term)
		sigsuspend(&old);
	printf("wait-term.handled=1\n");
	return 0;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc < 2) {
		fprintf(stderr, "usage: abi mm|fork|signals|demand|threads|wait-term\n");
		return 2;
	}
	if (!strcmp(argv[1], "mm"))
		return mm();
	if (!strcmp(argv[1], "fork"))
		return forks();
	if (!strcmp(argv[1], "signals"))
		return signals();
	if (!strcmp(argv[1], "demand"))
		return demand();
	if (!strcmp(argv[1], "threads"))
		return threads();
	if (!strcmp(argv[1], "wait-term"))
		return wait_term();
	fprintf(stderr, "abi: unknown case %s\n", argv[1]);
	return 2;
}

/*
 * spinner: threads that keep memory and registers in step, to check that a checkpoint and
 * a rollback capture and restore both at one instant.
 *
 * Each of THREADS threads (default 3) owns four pages and loops forever: it increments a
 * counter in each page and the same counter in a general register (r15) and in an SSE
 * register, with no syscall in the loop, then checks that all six agree. A rollback that
 * restored memory and registers from different instants shows as a line
 * "MISMATCH thread N ..." on stdout (the thread then re-synchronises and goes on).
 * The main thread prints "ready" and waits in pause().
 *
 * Usage: spinner [THREADS]
 */
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#define WORDS_PER_PAGE 512
#define PAGES_PER_THREAD 4

static volatile long *area;

static void *spin(void *arg)
{
	long id = (long)arg;
	volatile long *mine = area + id * WORDS_PER_PAGE * PAGES_PER_THREAD;
	register long shadow __asm__("r15") = mine[0];
	__m128i vec = _mm_set1_epi64x(mine[0]);
	for (;;) {
		for (int p = 0; p < PAGES_PER_THREAD; p++)
			mine[p * WORDS_PER_PAGE] += 1;
		shadow += 1;
		vec = _mm_add_epi64(vec, _mm_set1_epi64x(1));
		__asm__ volatile("" : "+r"(shadow), "+x"(vec));
		long v = _mm_cvtsi128_si64(vec);
		int bad = v != shadow;
		for (int p = 0; p < PAGES_PER_THREAD; p++)
			bad |= mine[p * WORDS_PER_PAGE] != shadow;
		if (bad) {
			printf("MISMATCH thread %ld pages=%ld,%ld,%ld,%ld r15=%ld xmm=%ld\n", id,
			       mine[0], mine[WORDS_PER_PAGE], mine[2 * WORDS_PER_PAGE],
			       mine[3 * WORDS_PER_PAGE], shadow, v);
			fflush(stdout);
			shadow = mine[0];
			vec = _mm_set1_epi64x(shadow);
			for (int p = 0; p < PAGES_PER_THREAD; p++)
				mine[p * WORDS_PER_PAGE] = shadow;
		}
	}
	return NULL;
}

int main(int argc, char **argv)
{
	long threads = argc > 1 ? atol(argv[1]) : 3;
	if (threads < 1 || threads > 64) {
		fprintf(stderr, "usage: spinner [THREADS (1-64)]\n");
		return 2;
	}
	area = mmap(NULL, threads * PAGES_PER_THREAD * 4096, PROT_READ | PROT_WRITE,
		    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (area == MAP_FAILED) {
		perror("mmap");
		return 1;
	}
	for (long i = 0; i < threads; i++) {
		pthread_t t;
		if (pthread_create(&t, NULL, spin, (void *)i) != 0) {
			perror("pthread_create");
			return 1;
		}
	}
	printf("ready threads=%ld\n", threads);
	fflush(stdout);
	for (;;)
		pause();
}

/*
 * dirtier - writes a fixed number of pages per round, forever, for the
 * checkpoint benchmark (bench/checkpoint).
 *
 *   dirtier PAGES [SLEEP_US]
 *
 * Maps PAGES anonymous pages (0..20000), touches each once, prints
 * "ready pages=PAGES" on stdout and flushes it, then loops: one round
 * increments one byte in each of the PAGES pages (exactly PAGES buffer pages
 * written per round) and the global round counter, then sleeps SLEEP_US
 * microseconds (default 200; 0 = no sleep). With PAGES = 0 a round only
 * bumps the counter and sleeps. It never exits on its own: the benchmark
 * kills it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE_SIZE 4096UL
#define MAX_PAGES 20000UL
#define MAX_SLEEP_US 10000000UL

/* Rounds completed; volatile so every round really stores it. */
static volatile uint64_t rounds;

static void usage(void)
{
	fprintf(stderr, "usage: dirtier PAGES [SLEEP_US]   (PAGES 0..%lu, "
			"SLEEP_US 0..%lu, default 200)\n",
		MAX_PAGES, MAX_SLEEP_US);
	exit(2);
}

static unsigned long parse_num(const char *what, const char *s,
			       unsigned long max)
{
	unsigned long v;
	char *end;

	errno = 0;
	v = strtoul(s, &end, 10);
	if (errno != 0 || *s < '0' || *s > '9' || *end != '\0' || v > max) {
		fprintf(stderr, "dirtier: invalid %s '%s' (expected 0..%lu)\n",
			what, s, max);
		exit(2);
	}
	return v;
}

int main(int argc, char **argv)
{
	unsigned long pages, sleep_us = 200, i;
	volatile uint8_t *buf = NULL;
	struct timespec pause;

	if (argc < 2 || argc > 3)
		usage();
	pages = parse_num("PAGES", argv[1], MAX_PAGES);
	if (argc == 3)
		sleep_us = parse_num("SLEEP_US", argv[2], MAX_SLEEP_US);

	if (pages > 0) {
		void *p = mmap(NULL, pages * PAGE_SIZE, PROT_READ | PROT_WRITE,
			       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (p == MAP_FAILED) {
			perror("dirtier: mmap");
			return 1;
		}
		buf = p;
		for (i = 0; i < pages; i++)
			buf[i * PAGE_SIZE] = 1;
	}

	printf("ready pages=%lu\n", pages);
	if (fflush(stdout) != 0) {
		perror("dirtier: stdout");
		return 1;
	}

	pause.tv_sec = (time_t)(sleep_us / 1000000);
	pause.tv_nsec = (long)(sleep_us % 1000000) * 1000;
	for (;;) {
		for (i = 0; i < pages; i++)
			buf[i * PAGE_SIZE]++;
		rounds++;
		if (sleep_us > 0) {
			struct timespec left = pause;

			/* A signal or a restored checkpoint may cut a sleep
			 * short; the rest of the sleep is finished. */
			while (nanosleep(&left, &left) != 0 && errno == EINTR)
				;
		}
	}
}

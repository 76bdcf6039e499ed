/*
 * The baseline of bench/checkpoint: copying PAGES scattered 4 KiB pages from
 * one large prefaulted mapping into another at the same offsets, the way the
 * checkpoint engine copies dirty guest pages into its mirror.
 *
 *   memcpy PAGES
 *
 * Both mappings are REGION_PAGES pages (256 MiB), prefaulted. PAGES distinct
 * pages are picked at random (fixed seed) and copied in ascending address
 * order, as a walk of a dirty bitmap would. Before each timed repetition one
 * byte of every source page is written (untimed), as the guest writes its
 * pages between two checkpoints. Prints the median time of one copy of all
 * PAGES pages over at least MIN_REPS repetitions:
 *
 *   memcpy_us_median=12.34 pages=100 reps=500
 *
 * Built by bench/checkpoint with gcc -O2; not a guest program.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#define PAGE 4096UL
#define REGION_PAGES 65536UL
#define MIN_REPS 50
#define MAX_REPS 5000
#define MIN_SECONDS 0.3

static volatile uint8_t sink;

static double now_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec * 1e6 + (double)ts.tv_nsec / 1e3;
}

static int cmp_size(const void *a, const void *b)
{
	size_t x = *(const size_t *)a, y = *(const size_t *)b;

	return (x > y) - (x < y);
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return (x > y) - (x < y);
}

static uint8_t *map_region(void)
{
	void *p = mmap(NULL, REGION_PAGES * PAGE, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);

	if (p == MAP_FAILED) {
		perror("memcpy: mmap");
		exit(1);
	}
	/* MAP_POPULATE may map the shared zero page; write every page. */
	memset(p, 0x5a, REGION_PAGES * PAGE);
	return p;
}

int main(int argc, char **argv)
{
	static double times[MAX_REPS];
	unsigned long pages;
	size_t *all, i, reps = 0;
	uint8_t *src, *dst;
	double start;
	char *end;

	if (argc != 2) {
		fprintf(stderr, "usage: memcpy PAGES   (0..%lu)\n", REGION_PAGES);
		return 2;
	}
	errno = 0;
	pages = strtoul(argv[1], &end, 10);
	if (errno != 0 || *argv[1] < '0' || *argv[1] > '9' || *end != '\0' ||
	    pages > REGION_PAGES) {
		fprintf(stderr, "memcpy: invalid PAGES '%s' (0..%lu)\n",
			argv[1], REGION_PAGES);
		return 2;
	}

	src = map_region();
	dst = map_region();

	/* Partial Fisher-Yates: the first `pages` entries are distinct. */
	all = malloc(REGION_PAGES * sizeof(*all));
	if (all == NULL) {
		perror("memcpy: malloc");
		return 1;
	}
	for (i = 0; i < REGION_PAGES; i++)
		all[i] = i;
	srand(12345);
	for (i = 0; i < pages; i++) {
		size_t j = i + (size_t)rand() % (REGION_PAGES - i), t = all[i];

		all[i] = all[j];
		all[j] = t;
	}
	qsort(all, pages, sizeof(*all), cmp_size);

	start = now_us();
	while (reps < MAX_REPS &&
	       (reps < MIN_REPS || now_us() - start < MIN_SECONDS * 1e6)) {
		double t0;

		for (i = 0; i < pages; i++)
			src[all[i] * PAGE]++;
		t0 = now_us();
		for (i = 0; i < pages; i++) {
			size_t off = all[i] * PAGE;

			memcpy(dst + off, src + off, PAGE);
		}
		times[reps++] = now_us() - t0;
		if (pages > 0)
			sink = dst[all[reps % pages] * PAGE];
	}
	qsort(times, reps, sizeof(times[0]), cmp_double);
	printf("memcpy_us_median=%.2f pages=%lu reps=%zu\n", times[reps / 2],
	       pages, reps);
	return 0;
}

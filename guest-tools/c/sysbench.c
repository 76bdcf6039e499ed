/*
 * sysbench - micro-benchmarks that run unchanged natively and in the guest.
 *
 *   sysbench getpid N                 raw getpid syscall cost
 *   sysbench trap N                   int3 -> SIGTRAP handler -> return cost
 *   sysbench echo-server PORT         blocking TCP echo on 127.0.0.1:PORT
 *   sysbench echo-client PORT N SIZE  round-trip latency against the server
 *
 * The loop benchmarks time BATCHES batches of N/BATCHES operations each with
 * CLOCK_MONOTONIC and report the median per-operation cost, which discards
 * batches disturbed by preemption or host activity.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define BATCHES 50

static void usage(void)
{
	fprintf(stderr,
		"usage: sysbench getpid N\n"
		"       sysbench trap N\n"
		"       sysbench echo-server PORT\n"
		"       sysbench echo-client PORT N SIZE\n");
	exit(2);
}

static unsigned long parse_num(const char *what, const char *s,
			       unsigned long min, unsigned long max)
{
	unsigned long v;
	char *end;

	errno = 0;
	v = strtoul(s, &end, 10);
	if (errno != 0 || *s < '0' || *s > '9' || *end != '\0' || v < min ||
	    v > max) {
		fprintf(stderr, "sysbench: invalid %s '%s' (expected %lu..%lu)\n",
			what, s, min, max);
		exit(2);
	}
	return v;
}

static uint64_t now_ns(void)
{
	struct timespec ts;

	if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0) {
		perror("sysbench: clock_gettime");
		exit(1);
	}
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return (x > y) - (x < y);
}

/* Sorts V in place. */
static double median(double *v, size_t n)
{
	qsort(v, n, sizeof(*v), cmp_double);
	return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

/* Nearest-rank percentile of an array sorted ascending. */
static double percentile(const double *sorted, size_t n, unsigned pct)
{
	size_t rank = (n * pct + 99) / 100;

	return sorted[rank ? rank - 1 : 0];
}

/* ------------------------------------------------------------------------ */
/* Loop benchmarks                                                          */
/* ------------------------------------------------------------------------ */

static inline void raw_getpid(void)
{
	long ret;

	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"((long)SYS_getpid)
			 : "rcx", "r11", "memory");
	(void)ret;
}

static inline void raw_int3(void)
{
	__asm__ volatile("int3" ::: "memory");
}

static volatile sig_atomic_t traps_taken;

/* The CPU reports #BP with RIP already past int3, so returning resumes. */
static void on_sigtrap(int sig, siginfo_t *info, void *uctx)
{
	(void)sig;
	(void)info;
	(void)uctx;
	traps_taken++;
}

static double run_batches(void (*op)(void), unsigned long n)
{
	unsigned long per = n / BATCHES ? n / BATCHES : 1;
	double ns[BATCHES];

	for (int b = 0; b < BATCHES; b++) {
		uint64_t t0 = now_ns();

		for (unsigned long i = 0; i < per; i++)
			op();
		ns[b] = (double)(now_ns() - t0) / (double)per;
	}
	return median(ns, BATCHES);
}

static void bench_getpid(unsigned long n)
{
	printf("getpid_ns_median=%.1f\n", run_batches(raw_getpid, n));
	fflush(stdout);
}

static void bench_trap(unsigned long n)
{
	struct sigaction sa = { 0 };
	double result;

	sa.sa_sigaction = on_sigtrap;
	sa.sa_flags = SA_SIGINFO;
	sigemptyset(&sa.sa_mask);
	if (sigaction(SIGTRAP, &sa, NULL) != 0) {
		perror("sysbench: sigaction(SIGTRAP)");
		exit(1);
	}
	traps_taken = 0;
	result = run_batches(raw_int3, n);
	if (traps_taken == 0) {
		fprintf(stderr, "sysbench: SIGTRAP handler never ran\n");
		exit(1);
	}
	printf("trap_ns_median=%.1f\n", result);
	fflush(stdout);
}

/* ------------------------------------------------------------------------ */
/* TCP echo                                                                 */
/* ------------------------------------------------------------------------ */

static int write_all(int fd, const char *buf, size_t len)
{
	while (len > 0) {
		ssize_t n = write(fd, buf, len);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return -1;
		buf += n;
		len -= (size_t)n;
	}
	return 0;
}

/* Returns 0 on success, 1 on EOF before LEN bytes, -1 on error. */
static int read_all(int fd, char *buf, size_t len)
{
	while (len > 0) {
		ssize_t n = read(fd, buf, len);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -1;
		if (n == 0)
			return 1;
		buf += n;
		len -= (size_t)n;
	}
	return 0;
}

static struct sockaddr_in loopback(unsigned long port)
{
	struct sockaddr_in addr = { .sin_family = AF_INET };

	addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	addr.sin_port = htons((uint16_t)port);
	return addr;
}

static void echo_server(unsigned long port)
{
	struct sockaddr_in addr = loopback(port);
	socklen_t len = sizeof(addr);
	char buf[65536];
	int one = 1;
	int lfd, cfd;

	lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (lfd < 0 ||
	    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0 ||
	    bind(lfd, (struct sockaddr *)&addr, sizeof(addr)) < 0 ||
	    listen(lfd, 1) < 0 ||
	    getsockname(lfd, (struct sockaddr *)&addr, &len) < 0) {
		perror("sysbench: echo-server listen");
		exit(1);
	}
	printf("echo: listening on 127.0.0.1:%u\n", ntohs(addr.sin_port));
	fflush(stdout);

	do
		cfd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
	while (cfd < 0 && (errno == EINTR || errno == ECONNABORTED));
	if (cfd < 0) {
		perror("sysbench: accept4");
		exit(1);
	}
	close(lfd);

	for (;;) {
		ssize_t n = read(cfd, buf, sizeof(buf));

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && errno == ECONNRESET)
			break;
		if (n < 0) {
			perror("sysbench: read");
			exit(1);
		}
		if (n == 0)
			break;
		if (write_all(cfd, buf, (size_t)n) < 0) {
			if (errno == EPIPE || errno == ECONNRESET)
				break;
			perror("sysbench: write");
			exit(1);
		}
	}
	close(cfd);
}

static void echo_client(unsigned long port, unsigned long n, unsigned long size)
{
	struct sockaddr_in addr = loopback(port);
	double *us = calloc(n, sizeof(*us));
	char *out = malloc(size), *in = malloc(size);
	double med;
	int one = 1;
	int fd;

	if (us == NULL || out == NULL || in == NULL) {
		fprintf(stderr, "sysbench: out of memory\n");
		exit(1);
	}
	for (unsigned long i = 0; i < size; i++)
		out[i] = (char)('a' + i % 26);

	fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0 ||
	    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) < 0 ||
	    connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
		perror("sysbench: echo-client connect");
		exit(1);
	}

	for (unsigned long i = 0; i < n; i++) {
		uint64_t t0 = now_ns();
		int rc;

		if (write_all(fd, out, size) < 0) {
			perror("sysbench: write");
			exit(1);
		}
		rc = read_all(fd, in, size);
		if (rc != 0) {
			if (rc < 0)
				perror("sysbench: read");
			else
				fprintf(stderr, "sysbench: server closed early\n");
			exit(1);
		}
		us[i] = (double)(now_ns() - t0) / 1000.0;
		if (memcmp(in, out, size) != 0) {
			fprintf(stderr, "sysbench: echo mismatch in round %lu\n", i);
			exit(1);
		}
	}
	close(fd);

	med = median(us, n); /* sorts US for the percentile */
	printf("echo_us_median=%.2f echo_us_p99=%.2f\n", med,
	       percentile(us, n, 99));
	fflush(stdout);
	free(us);
	free(out);
	free(in);
}

int main(int argc, char **argv)
{
	/* A vanished peer is reported as EPIPE rather than killing us. */
	signal(SIGPIPE, SIG_IGN);

	if (argc == 3 && strcmp(argv[1], "getpid") == 0) {
		bench_getpid(parse_num("N", argv[2], 1, ULONG_MAX));
	} else if (argc == 3 && strcmp(argv[1], "trap") == 0) {
		bench_trap(parse_num("N", argv[2], 1, ULONG_MAX));
	} else if (argc == 3 && strcmp(argv[1], "echo-server") == 0) {
		echo_server(parse_num("PORT", argv[2], 0, 65535));
	} else if (argc == 5 && strcmp(argv[1], "echo-client") == 0) {
		echo_client(parse_num("PORT", argv[2], 1, 65535),
			    parse_num("N", argv[3], 1, 100000000),
			    parse_num("SIZE", argv[4], 1, 64u << 20));
	} else {
		usage();
	}
	return 0;
}

/*
 * asker - a line server that asks a backend before it answers: the case of a rescue
 * window that must wait for a peer that needs the window's own output.
 *
 * Usage: asker -p PORT -b BACKEND_PORT
 *
 * For each client line, ask_backend() opens a connection to 127.0.0.1:BACKEND_PORT,
 * writes the line, waits (blocking) for one reply line and returns its length; a line
 * starting with "crash" makes it dereference NULL after the reply came. The client gets
 * "OK <reply>" or, when ask_backend() returns -1, "ERROR". Clients are served one at a
 * time, one line each.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define NOINLINE __attribute__((noinline))

static int backend_port;

/* Never set: what a missing NULL check dereferences. */
int *volatile missing_record;

static ssize_t read_line(int fd, char *buf, size_t cap)
{
	size_t n = 0;

	while (n + 1 < cap) {
		ssize_t r = read(fd, buf + n, 1);

		if (r <= 0)
			return -1;
		if (buf[n] == '\n')
			break;
		n++;
	}
	buf[n] = '\0';
	return (ssize_t)n;
}

NOINLINE int ask_backend(const char *line, char *answer, size_t cap)
{
	struct sockaddr_in sa = { .sin_family = AF_INET };
	char query[600];
	ssize_t n;
	int fd = socket(AF_INET, SOCK_STREAM, 0);

	if (fd < 0)
		return -1;
	sa.sin_port = htons((unsigned short)backend_port);
	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		close(fd);
		return -1;
	}
	n = snprintf(query, sizeof(query), "%s\n", line);
	if (n < 0 || (size_t)n >= sizeof(query) || write(fd, query, (size_t)n) != n) {
		close(fd);
		return -1;
	}
	/* Blocks until the backend answers: it needs the query just written. */
	n = read_line(fd, answer, cap);
	close(fd);
	if (n < 0)
		return -1;
	if (strncmp(line, "crash", 5) == 0)
		*missing_record = 1;
	return (int)n;
}

int main(int argc, char **argv)
{
	struct sockaddr_in sa = { .sin_family = AF_INET };
	socklen_t len = sizeof(sa);
	int port = 0, lfd, one = 1, opt;

	while ((opt = getopt(argc, argv, "p:b:")) != -1) {
		if (opt == 'p')
			port = atoi(optarg);
		else if (opt == 'b')
			backend_port = atoi(optarg);
		else
			return 2;
	}
	lfd = socket(AF_INET, SOCK_STREAM, 0);
	setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	sa.sin_port = htons((unsigned short)port);
	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (bind(lfd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(lfd, 16) < 0 ||
	    getsockname(lfd, (struct sockaddr *)&sa, &len) < 0) {
		perror("asker: listen");
		return 1;
	}
	printf("asker: listening on 127.0.0.1:%d\n", ntohs(sa.sin_port));
	fflush(stdout);
	for (;;) {
		char line[512], answer[512], reply[1100];
		int cfd = accept(lfd, NULL, NULL), n;

		if (cfd < 0)
			continue;
		if (read_line(cfd, line, sizeof(line)) >= 0) {
			if (ask_backend(line, answer, sizeof(answer)) < 0)
				n = snprintf(reply, sizeof(reply), "ERROR\n");
			else
				n = snprintf(reply, sizeof(reply), "OK %s\n", answer);
			if (write(cfd, reply, (size_t)n) != n)
				perror("asker: write");
		}
		close(cfd);
	}
}

/*
 * filer: file operations on command, for tests of what a rollback does to files.
 *
 * Reads lines from stdin, answers each with "ok" or "error ERRNO" on stdout:
 *   rm PATH          unlink(PATH)
 *   write PATH TEXT  create or truncate PATH and write TEXT and a newline
 * Prints "ready" first; exits 0 at end of input.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

int main(void)
{
	char line[4096];
	printf("ready\n");
	fflush(stdout);
	while (fgets(line, sizeof line, stdin)) {
		line[strcspn(line, "\n")] = 0;
		int r = -1;
		if (strncmp(line, "rm ", 3) == 0) {
			r = unlink(line + 3);
		} else if (strncmp(line, "write ", 6) == 0) {
			char *path = line + 6;
			char *text = strchr(path, ' ');
			if (text) {
				*text++ = 0;
				int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
				if (fd >= 0) {
					size_t n = strlen(text);
					text[n] = '\n';
					r = write(fd, text, n + 1) == (ssize_t)(n + 1) ? 0 : -1;
					close(fd);
				}
			} else {
				errno = EINVAL;
			}
		} else {
			errno = EINVAL;
		}
		if (r == 0)
			printf("ok\n");
		else
			printf("error %d\n", errno);
		fflush(stdout);
	}
	return 0;
}

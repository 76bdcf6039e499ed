/*
 * hostile - probes the syscall layer with invalid arguments and path-escape
 * attempts, printing one "CASE=RESULT" line per case.
 *
 * RESULT is the non-negative return value, the errno name for a failure, a
 * word for cases whose raw value is not reproducible (brk), or for the
 * open-and-read cases "READ:<first line of the file>".
 *
 * Every probe is a raw syscall instruction so that no libc wrapper validates
 * or rewrites the arguments first.
 *
 * Expected fixture. The program runs with its current directory, and "/" as
 * seen by the guest, at a fixture root containing:
 *   data.txt              regular file, contents "hello\n"
 *   dir/                  empty directory
 *   link_abs  -> /../../secret.txt
 *   link_rel  -> ../secret.txt
 *   dir/link_up -> ../../../secret.txt
 *   link_loop -> link_loop
 * and the PARENT directory of the root contains secret.txt ("SECRET\n"),
 * which must never be readable from inside the guest.
 *
 * Stdout must be a pipe, regular file or terminal (not /dev/null): the write
 * probes target fd 1 and /dev/null accepts any buffer without reading it.
 *
 * Group "abi." must print identical output natively and in the guest. Group
 * "jail." checks confinement: natively (without a chroot) some of those cases
 * do read SECRET; in the guest none may.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096ul

static long raw6(long nr, long a1, long a2, long a3, long a4, long a5, long a6)
{
	register long r10 __asm__("r10") = a4;
	register long r8 __asm__("r8") = a5;
	register long r9 __asm__("r9") = a6;
	long ret;

	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"(nr), "D"(a1), "S"(a2), "d"(a3), "r"(r10),
			   "r"(r8), "r"(r9)
			 : "rcx", "r11", "memory");
	return ret;
}

#define ARG(x) ((long)(x))
#define SYS0(nr) raw6(nr, 0, 0, 0, 0, 0, 0)
#define SYS1(nr, a) raw6(nr, ARG(a), 0, 0, 0, 0, 0)
#define SYS2(nr, a, b) raw6(nr, ARG(a), ARG(b), 0, 0, 0, 0)
#define SYS3(nr, a, b, c) raw6(nr, ARG(a), ARG(b), ARG(c), 0, 0, 0)
#define SYS4(nr, a, b, c, d) raw6(nr, ARG(a), ARG(b), ARG(c), ARG(d), 0, 0)
#define SYS6(nr, a, b, c, d, e, f) \
	raw6(nr, ARG(a), ARG(b), ARG(c), ARG(d), ARG(e), ARG(f))

static const char *errno_name(long e)
{
	static const struct {
		int num;
		const char *name;
	} names[] = {
		{ EPERM, "EPERM" },
		{ ENOENT, "ENOENT" },
		{ ESRCH, "ESRCH" },
		{ EINTR, "EINTR" },
		{ EIO, "EIO" },
		{ ENXIO, "ENXIO" },
		{ E2BIG, "E2BIG" },
		{ ENOEXEC, "ENOEXEC" },
		{ EBADF, "EBADF" },
		{ ECHILD, "ECHILD" },
		{ EAGAIN, "EAGAIN" },
		{ ENOMEM, "ENOMEM" },
		{ EACCES, "EACCES" },
		{ EFAULT, "EFAULT" },
		{ EBUSY, "EBUSY" },
		{ EEXIST, "EEXIST" },
		{ EXDEV, "EXDEV" },
		{ ENODEV, "ENODEV" },
		{ ENOTDIR, "ENOTDIR" },
		{ EISDIR, "EISDIR" },
		{ EINVAL, "EINVAL" },
		{ ENFILE, "ENFILE" },
		{ EMFILE, "EMFILE" },
		{ ENOTTY, "ENOTTY" },
		{ EFBIG, "EFBIG" },
		{ ENOSPC, "ENOSPC" },
		{ ESPIPE, "ESPIPE" },
		{ EROFS, "EROFS" },
		{ EMLINK, "EMLINK" },
		{ EPIPE, "EPIPE" },
		{ EDOM, "EDOM" },
		{ ERANGE, "ERANGE" },
		{ EDEADLK, "EDEADLK" },
		{ ENAMETOOLONG, "ENAMETOOLONG" },
		{ ENOLCK, "ENOLCK" },
		{ ENOSYS, "ENOSYS" },
		{ ENOTEMPTY, "ENOTEMPTY" },
		{ ELOOP, "ELOOP" },
		{ ENODATA, "ENODATA" },
		{ EOVERFLOW, "EOVERFLOW" },
		{ ENOTSOCK, "ENOTSOCK" },
		{ EDESTADDRREQ, "EDESTADDRREQ" },
		{ EMSGSIZE, "EMSGSIZE" },
		{ EPROTOTYPE, "EPROTOTYPE" },
		{ ENOPROTOOPT, "ENOPROTOOPT" },
		{ EPROTONOSUPPORT, "EPROTONOSUPPORT" },
		{ EOPNOTSUPP, "EOPNOTSUPP" },
		{ EAFNOSUPPORT, "EAFNOSUPPORT" },
		{ EADDRINUSE, "EADDRINUSE" },
		{ EADDRNOTAVAIL, "EADDRNOTAVAIL" },
		{ ENETUNREACH, "ENETUNREACH" },
		{ ECONNABORTED, "ECONNABORTED" },
		{ ECONNRESET, "ECONNRESET" },
		{ ENOBUFS, "ENOBUFS" },
		{ EISCONN, "EISCONN" },
		{ ENOTCONN, "ENOTCONN" },
		{ ETIMEDOUT, "ETIMEDOUT" },
		{ ECONNREFUSED, "ECONNREFUSED" },
		{ EALREADY, "EALREADY" },
		{ EINPROGRESS, "EINPROGRESS" },
		{ ECANCELED, "ECANCELED" },
	};
	static char unknown[32];

	for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
		if (names[i].num == e)
			return names[i].name;
	snprintf(unknown, sizeof(unknown), "E%ld", e);
	return unknown;
}

static void emit(const char *name, const char *value)
{
	printf("%s=%s\n", name, value);
	fflush(stdout);
}

/* Kernel convention: -4095..-1 is -errno, anything else is a result. */
static void report(const char *name, long ret)
{
	char num[32];

	if (ret < 0 && ret >= -4095) {
		emit(name, errno_name(-ret));
		return;
	}
	snprintf(num, sizeof(num), "%ld", ret);
	emit(name, num);
}

/* Closes a descriptor that a failing probe unexpectedly returned. */
static void report_fd(const char *name, long ret)
{
	report(name, ret);
	if (ret >= 0)
		SYS1(SYS_close, ret);
}

static void *map_pages(size_t n)
{
	long p = SYS6(SYS_mmap, 0, n * PAGE, PROT_READ | PROT_WRITE,
		      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (p < 0 && p >= -4095) {
		fprintf(stderr, "hostile: mmap failed: %s\n", errno_name(-p));
		exit(1);
	}
	return (void *)p;
}

static long open_fixture(const char *path, int flags)
{
	long fd = SYS4(SYS_openat, AT_FDCWD, path, flags | O_CLOEXEC, 0);

	if (fd < 0) {
		fprintf(stderr, "hostile: fixture %s missing: %s\n", path,
			errno_name(-fd));
		exit(1);
	}
	return fd;
}

/* Outside .bss a 1 TiB length fails access_ok() on the stack or mmap area. */
static char static_buf[PAGE];
static struct iovec many_iov[2000];

static void noop_handler(int sig)
{
	(void)sig;
}

static void abi_cases(void)
{
	const long kernel_addr = (long)0xffff800000000000ul;
	struct {
		unsigned long handler, flags, restorer, mask;
	} act = { (unsigned long)noop_handler, 0, 0, 0 };
	struct epoll_event ev = { .events = EPOLLIN };
	struct epoll_event events[4];
	struct pollfd pfd = { .fd = 0, .events = POLLIN };
	struct sockaddr_storage sa;
	socklen_t sa_len = sizeof(sa);
	struct iovec iov;
	char *page, *gone, *edge;
	char *long_path;
	long data_fd, dir_fd, ep_fd, cur, ret;
	int foreign = 0;

	data_fd = open_fixture("data.txt", O_RDONLY);
	dir_fd = open_fixture("dir", O_RDONLY | O_DIRECTORY);

	page = map_pages(1);
	gone = map_pages(1);
	SYS2(SYS_munmap, gone, PAGE);
	/* Two pages, second unmapped: a string can run into the hole. */
	edge = map_pages(2);
	SYS2(SYS_munmap, edge + PAGE, PAGE);

	/* Bad buffers for read/write. */
	report("abi.read_null", SYS3(SYS_read, data_fd, NULL, 16));
	report("abi.read_kernel_addr", SYS3(SYS_read, data_fd, kernel_addr, 16));
	report("abi.read_unmapped", SYS3(SYS_read, data_fd, gone, 16));
	report("abi.write_null", SYS3(SYS_write, 1, NULL, 16));
	report("abi.write_unmapped", SYS3(SYS_write, 1, gone, 16));
	SYS3(SYS_lseek, data_fd, 0, SEEK_SET);
	report("abi.read_huge_len",
	       SYS3(SYS_read, data_fd, static_buf, 1ul << 40));
	report("abi.pread_negative_offset",
	       SYS4(SYS_pread64, data_fd, static_buf, 16, -1));

	/* Bad descriptors. */
	report("abi.close_bad_fd", SYS1(SYS_close, 12345));
	report("abi.read_bad_fd", SYS3(SYS_read, 9999, static_buf, 16));
	/* INT_MAX exceeds any possible RLIMIT_NOFILE (fs.nr_open is lower). */
	report_fd("abi.dup2_huge_fd", SYS2(SYS_dup2, 1, INT_MAX));

	/* Bad paths. */
	report_fd("abi.openat_null",
		  SYS4(SYS_openat, AT_FDCWD, NULL, O_RDONLY, 0));
	report_fd("abi.openat_unmapped",
		  SYS4(SYS_openat, AT_FDCWD, gone, O_RDONLY, 0));
	long_path = malloc(5001);
	if (long_path == NULL)
		exit(1);
	memset(long_path, 'a', 5000);
	long_path[5000] = '\0';
	report_fd("abi.openat_too_long",
		  SYS4(SYS_openat, AT_FDCWD, long_path, O_RDONLY, 0));
	free(long_path);
	/* Shorter than PATH_MAX, so the copy faults before the length limit. */
	memset(edge + PAGE - 64, 'a', 64);
	report_fd("abi.openat_unterminated",
		  SYS4(SYS_openat, AT_FDCWD, edge + PAGE - 64, O_RDONLY, 0));

	/* Memory management. */
	ret = SYS6(SYS_mmap, 0, 1ul << 62, PROT_READ,
		   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (ret < 0 && ret >= -4095) {
		report("abi.mmap_huge", ret);
	} else {
		emit("abi.mmap_huge", "mapped");
		SYS2(SYS_munmap, ret, 1ul << 62);
	}
	report("abi.munmap_unaligned", SYS2(SYS_munmap, page + 1, PAGE));
	/* Below the executable image, never part of any mapping. */
	report("abi.mprotect_unmapped",
	       SYS3(SYS_mprotect, 0x10000, PAGE, PROT_READ));
	cur = SYS1(SYS_brk, 0);
	ret = SYS1(SYS_brk, 1ul << 46);
	emit("abi.brk_huge", ret == cur ? "unchanged" : "changed");
	if (ret != cur)
		SYS1(SYS_brk, cur);

	/*
	 * Syscall numbers with no implementation. 335 is not used: since Linux
	 * 6.11 it is uretprobe, which raises SIGILL outside a uprobe trampoline.
	 */
	report("abi.syscall_1000", SYS0(1000));
	report("abi.syscall_minus1", SYS0(-1));
	report("abi.syscall_huge", SYS0(0x7fffffffl));

	/* Bad output pointers and arguments. */
	report("abi.getdents64_null", SYS3(SYS_getdents64, dir_fd, NULL, 4096));
	report("abi.clock_gettime_null",
	       SYS2(SYS_clock_gettime, CLOCK_MONOTONIC, NULL));
	report("abi.clock_gettime_bad_clock",
	       SYS2(SYS_clock_gettime, 1234, static_buf));

	ep_fd = SYS1(SYS_epoll_create1, EPOLL_CLOEXEC);
	report("abi.epoll_ctl_bad_fd",
	       SYS4(SYS_epoll_ctl, ep_fd, EPOLL_CTL_ADD, 9999, &ev));
	report("abi.epoll_wait_zero", SYS4(SYS_epoll_wait, ep_fd, events, 0, 0));
	report("abi.epoll_wait_huge",
	       SYS4(SYS_epoll_wait, ep_fd, events, 1 << 30, 0));
	if (ep_fd >= 0)
		SYS1(SYS_close, ep_fd);
	/* Above any RLIMIT_NOFILE, like dup2_huge_fd. */
	report("abi.poll_huge_nfds", SYS3(SYS_poll, &pfd, 1u << 31, 0));

	report("abi.writev_too_many", SYS3(SYS_writev, 1, many_iov, 2000));
	report("abi.writev_null_iov", SYS3(SYS_writev, 1, NULL, 1));
	iov.iov_base = NULL;
	iov.iov_len = 10;
	report("abi.writev_null_base", SYS3(SYS_writev, 1, &iov, 1));

	report("abi.getsockname_not_socket",
	       SYS3(SYS_getsockname, data_fd, &sa, &sa_len));
	report_fd("abi.accept4_not_socket",
		  SYS4(SYS_accept4, data_fd, NULL, NULL, 0));

	report("abi.sigaction_sig0", SYS4(SYS_rt_sigaction, 0, &act, NULL, 8));
	report("abi.sigaction_sigkill",
	       SYS4(SYS_rt_sigaction, SIGKILL, &act, NULL, 8));

	report("abi.stat_null_buf", SYS2(SYS_stat, "data.txt", NULL));
	report("abi.newfstatat_null_buf",
	       SYS4(SYS_newfstatat, AT_FDCWD, "data.txt", NULL, 0));
	report("abi.uname_null", SYS1(SYS_uname, NULL));

	/* Absurd times: a futex wait whose timeout is the largest the ABI allows (the value
	 * does not match, so it returns at once), and an interval timer set far in the
	 * future, then disarmed. */
	{
		static int word = 7;
		struct timespec forever = { LONG_MAX, 999999999 };
		report("abi.futex_huge_timeout",
		       SYS4(SYS_futex, &word, 0 /* FUTEX_WAIT */, 8, &forever));
		struct { struct timeval interval, value; } far = { { LONG_MAX, 0 }, { LONG_MAX, 0 } }, off = { { 0, 0 }, { 0, 0 } };
		report("abi.setitimer_huge", SYS3(SYS_setitimer, 0 /* ITIMER_REAL */, &far, NULL));
		report("abi.setitimer_off", SYS3(SYS_setitimer, 0, &off, NULL));
	}

	/*
	 * With everything this program opened now closed, any descriptor
	 * above stderr belongs to someone else and must not be visible.
	 */
	SYS1(SYS_close, data_fd);
	SYS1(SYS_close, dir_fd);
	for (int fd = 3; fd < 1024; fd++)
		if (SYS3(SYS_fcntl, fd, F_GETFD, 0) != -EBADF)
			foreign++;
	printf("abi.foreign_fds=%d\n", foreign);
	fflush(stdout);

	SYS2(SYS_munmap, page, PAGE);
	SYS2(SYS_munmap, edge, PAGE);
}

/* Prints READ:<first line> when PATH (relative to DIRFD) can be read. */
static void try_read(const char *name, long dirfd, const char *path)
{
	char buf[256], line[300];
	long fd, n;

	fd = SYS4(SYS_openat, dirfd, path, O_RDONLY | O_CLOEXEC, 0);
	if (fd < 0) {
		report(name, fd);
		return;
	}
	n = SYS3(SYS_read, fd, buf, sizeof(buf) - 1);
	SYS1(SYS_close, fd);
	if (n < 0) {
		report(name, n);
		return;
	}
	buf[n] = '\0';
	buf[strcspn(buf, "\n")] = '\0';
	snprintf(line, sizeof(line), "READ:%s", buf);
	emit(name, line);
}

static void jail_cases(void)
{
	char target[PATH_MAX];
	long dir_fd, n;

	try_read("jail.dotdot", AT_FDCWD, "../secret.txt");
	try_read("jail.root_dotdot", AT_FDCWD, "/../secret.txt");
	try_read("jail.deep_dotdot", AT_FDCWD, "../../../../secret.txt");
	try_read("jail.link_abs", AT_FDCWD, "link_abs");
	try_read("jail.link_rel", AT_FDCWD, "link_rel");
	try_read("jail.link_up", AT_FDCWD, "dir/link_up");
	try_read("jail.proc_root", AT_FDCWD, "/proc/self/root/../secret.txt");
	try_read("jail.proc_cwd", AT_FDCWD, "/proc/self/cwd/../secret.txt");
	try_read("jail.link_loop", AT_FDCWD, "link_loop");

	dir_fd = SYS4(SYS_openat, AT_FDCWD, "dir",
		      O_RDONLY | O_DIRECTORY | O_CLOEXEC, 0);
	if (dir_fd < 0) {
		report("jail.dirfd_dotdot", dir_fd);
	} else {
		try_read("jail.dirfd_dotdot", dir_fd, "../../secret.txt");
		SYS1(SYS_close, dir_fd);
	}

	n = SYS3(SYS_readlink, "/proc/self/exe", target, sizeof(target) - 1);
	if (n < 0) {
		report("jail.exe", n);
	} else {
		target[n] = '\0';
		emit("jail.exe", target);
	}

	/* Last: it moves the current directory for good. */
	n = SYS1(SYS_chdir, "..");
	if (n < 0)
		report("jail.chdir_dotdot", n);
	else
		try_read("jail.chdir_dotdot", AT_FDCWD, "secret.txt");
}

int main(void)
{
	abi_cases();
	jail_cases();
	return 0;
}

/*
 * bugsrv - a small single-threaded HTTP/1.1 server with real error handling
 * and deliberately reachable bugs of the classes found in production C code.
 *
 * Usage: bugsrv [-a ADDR] [-p PORT] [-d DOCROOT]
 *
 * Request flow:
 *   event loop -> handle_connection_input() -> parse_request() -> 400 on -1
 *                                          -> process_request() -> 500 on -1
 *
 * parse_request() and process_request() are the recovery boundaries for a
 * supervisor that turns a crash below them into a -1 return, so they are
 * global, never inlined or cloned, and every handler error propagates through
 * process_request() as -1. The bug_* functions are global and never inlined so
 * they appear under their own names in crash reports.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <assert.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#define NOINLINE __attribute__((noinline, noclone))

#define MAX_HEADER_BYTES (8u * 1024u)
#define MAX_BODY_BYTES (1u * 1024u * 1024u)
#define MAX_BIG_BYTES (64ull * 1024u * 1024u)
#define INPUT_INITIAL_CAP (16u * 1024u)
#define INPUT_MAX_CAP (MAX_HEADER_BYTES + MAX_BODY_BYTES)
#define MAX_EVENTS 64

/* ------------------------------------------------------------------------ */
/* Request and response                                                     */
/* ------------------------------------------------------------------------ */

enum method { METHOD_OTHER, METHOD_GET, METHOD_HEAD, METHOD_POST };

struct request {
	enum method method;
	const char *path; /* request target without the query */
	size_t path_len;
	const char *query; /* after '?', NULL if absent */
	size_t query_len;
	int minor_version; /* HTTP/1.<minor_version> */
	bool keep_alive;
	bool expect_continue;
	size_t content_length;
	size_t header_len; /* bytes up to and including the blank line */
	const char *body;  /* valid once the whole body is buffered */
	int error_status;  /* status to answer with when parsing fails */
};

enum body_kind { BODY_NONE, BODY_STATIC, BODY_OWNED, BODY_PATTERN };

struct response {
	int status;
	const char *content_type;
	enum body_kind body_kind;
	const char *body; /* BODY_STATIC / BODY_OWNED */
	size_t body_len;
	bool close_after;
	bool exit_after;
};

/* Requests that process_request() completed, so /count excludes itself. */
unsigned long requests_served;

static const char *docroot = "/www";

/* ------------------------------------------------------------------------ */
/* Small helpers                                                            */
/* ------------------------------------------------------------------------ */

static const char *status_text(int status)
{
	switch (status) {
	case 100: return "Continue";
	case 200: return "OK";
	case 400: return "Bad Request";
	case 403: return "Forbidden";
	case 404: return "Not Found";
	case 405: return "Method Not Allowed";
	case 413: return "Content Too Large";
	case 414: return "URI Too Long";
	case 431: return "Request Header Fields Too Large";
	case 500: return "Internal Server Error";
	case 501: return "Not Implemented";
	default: return "Unknown";
	}
}

static bool is_tchar(unsigned char c)
{
	return isalnum(c) || (c != 0 && strchr("!#$%&'*+-.^_`|~", c) != NULL);
}

static bool span_equals(const char *s, size_t len, const char *lit)
{
	return strlen(lit) == len && memcmp(s, lit, len) == 0;
}

static bool span_iequals(const char *s, size_t len, const char *lit)
{
	return strlen(lit) == len && strncasecmp(s, lit, len) == 0;
}

static const char *find_crlfcrlf(const char *buf, size_t len)
{
	return memmem(buf, len, "\r\n\r\n", 4);
}

/* Strict decimal parser: digits only, no sign, no overflow. */
static bool parse_size(const char *s, size_t len, size_t *out)
{
	size_t v = 0;

	if (len == 0)
		return false;
	for (size_t i = 0; i < len; i++) {
		if (s[i] < '0' || s[i] > '9')
			return false;
		if (v > (SIZE_MAX - 9) / 10)
			return false;
		v = v * 10 + (size_t)(s[i] - '0');
	}
	*out = v;
	return true;
}

/* Finds NAME=VALUE in an &-separated query string; VALUE is returned raw. */
static bool query_param(const struct request *req, const char *name,
			const char **val, size_t *val_len)
{
	const char *p = req->query;
	const char *end = req->query + req->query_len;
	if (p == NULL)
		return false;
	while (p < end) {
		const char *amp = memchr(p, '&', (size_t)(end - p));
		const char *stop = amp ? amp : end;
		const char *eq = memchr(p, '=', (size_t)(stop - p));
		const char *key_end = eq ? eq : stop;

		if (span_equals(p, (size_t)(key_end - p), name)) {
			*val = eq ? eq + 1 : stop;
			*val_len = (size_t)(stop - *val);
			return true;
		}
		p = stop + 1;
	}
	return false;
}

/* Comma-separated, case-insensitive token search in a header value. */
static bool header_has_token(const char *v, size_t len, const char *token)
{
	const char *end = v + len;

	while (v < end) {
		const char *comma = memchr(v, ',', (size_t)(end - v));
		const char *stop = comma ? comma : end;
		const char *a = v, *b = stop;

		while (a < b && (*a == ' ' || *a == '\t'))
			a++;
		while (b > a && (b[-1] == ' ' || b[-1] == '\t'))
			b--;
		if (span_iequals(a, (size_t)(b - a), token))
			return true;
		v = stop + 1;
	}
	return false;
}

static void set_static(struct response *resp, int status, const char *body)
{
	resp->status = status;
	resp->content_type = "text/plain";
	resp->body_kind = BODY_STATIC;
	resp->body = body;
	resp->body_len = strlen(body);
}

/* Takes ownership of BODY (malloc'd). */
static void set_owned(struct response *resp, int status, const char *type,
		      char *body, size_t len)
{
	resp->status = status;
	resp->content_type = type;
	resp->body_kind = BODY_OWNED;
	resp->body = body;
	resp->body_len = len;
}

static int set_copy(struct response *resp, int status, const char *data,
		    size_t len)
{
	/* malloc(0) may return NULL legitimately; always allocate a byte. */
	char *copy = malloc(len ? len : 1);

	if (copy == NULL)
		return -1;
	memcpy(copy, data, len);
	set_owned(resp, status, "text/plain", copy, len);
	return 0;
}

static int set_printf(struct response *resp, int status, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

static int set_printf(struct response *resp, int status, const char *fmt, ...)
{
	char *text;
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vasprintf(&text, fmt, ap);
	va_end(ap);
	if (n < 0)
		return -1;
	set_owned(resp, status, "text/plain", text, (size_t)n);
	return 0;
}

static void response_release(struct response *resp)
{
	if (resp->body_kind == BODY_OWNED)
		free((void *)resp->body);
	resp->body_kind = BODY_NONE;
	resp->body = NULL;
	resp->body_len = 0;
}

/* ------------------------------------------------------------------------ */
/* Bugs                                                                     */
/* ------------------------------------------------------------------------ */

struct session_record {
	unsigned long id;
	char user[32];
	unsigned long hits;
};

/* Never set: the lookup "fails" in a way the compiler cannot see. */
struct session_record *volatile current_session;

NOINLINE int bug_null_deref(void)
{
	struct session_record *s = current_session;

	/* Missing NULL check before updating the session. */
	s->hits++;
	s->user[0] = 'x';
	return (int)s->hits;
}

NOINLINE int bug_divide(int d)
{
	/* volatile keeps the idiv at run time even if D were ever known. */
	volatile int total = 100;

	return total / d;
}

#define AUDIT_RECORD_WIDTH 2008

NOINLINE int bug_heap_overflow(void)
{
	char line[AUDIT_RECORD_WIDTH + 1];
	char *record;
	size_t i;
	int sum = 0;

	memset(line, '#', AUDIT_RECORD_WIDTH);
	line[AUDIT_RECORD_WIDTH] = '\0';

	/*
	 * Missing "+ 1" for the terminator: the copy writes the NUL into the low
	 * byte of the next chunk's size field, clearing its PREV_INUSE bit.
	 * The request size makes the chunk end exactly at that field and keeps
	 * it out of the tcache and fastbins, so free() always runs glibc's
	 * consistency check and aborts ("double free or corruption (!prev)").
	 */
	record = malloc(strlen(line));
	if (record == NULL)
		return -1;
	for (i = 0; (record[i] = line[i]) != '\0'; i++)
		;
	for (i = 0; i < AUDIT_RECORD_WIDTH; i += 64)
		sum += record[i];
	free(record);
	return sum;
}

NOINLINE int bug_stack_smash(const char *input, size_t len)
{
	char token[16];
	int sum = 0;

	/* Length comes from the request and is never checked against token. */
	memcpy(token, input, len);
	for (size_t i = 0; i < len && i < sizeof(token); i++)
		sum += (unsigned char)token[i];
	return sum;
}

volatile int pending_jobs;

NOINLINE int bug_assert(void)
{
	int jobs = pending_jobs - 1;

	assert(jobs >= 0 && "job counter underflow");
	pending_jobs = jobs;
	return jobs;
}

volatile unsigned long spin_counter;

NOINLINE int bug_infinite_loop(void)
{
	/* Waits for a condition that is never signalled. */
	for (;;)
		spin_counter++;
}

/* ------------------------------------------------------------------------ */
/* Handlers                                                                 */
/* ------------------------------------------------------------------------ */

static int handle_echo(const struct request *req, struct response *resp)
{
	const char *msg = "";
	size_t len = 0;

	if (req->method == METHOD_POST)
		return set_copy(resp, 200, req->body, req->content_length);
	query_param(req, "msg", &msg, &len);
	return set_copy(resp, 200, msg, len);
}

static int handle_big(const struct request *req, struct response *resp)
{
	const char *v;
	size_t len, n;

	if (!query_param(req, "n", &v, &len) || !parse_size(v, len, &n)) {
		set_static(resp, 400, "expected /big?n=BYTES\n");
		return 0;
	}
	if (n > MAX_BIG_BYTES) {
		set_static(resp, 400, "n is limited to 67108864\n");
		return 0;
	}
	resp->status = 200;
	resp->content_type = "application/octet-stream";
	resp->body_kind = BODY_PATTERN;
	resp->body_len = n;
	return 0;
}

static const char *guess_type(const char *name, size_t len)
{
	static const struct {
		const char *ext;
		const char *type;
	} types[] = {
		{ ".html", "text/html" },
		{ ".htm", "text/html" },
		{ ".txt", "text/plain" },
		{ ".css", "text/css" },
		{ ".js", "text/javascript" },
		{ ".json", "application/json" },
		{ ".png", "image/png" },
		{ ".jpg", "image/jpeg" },
		{ ".jpeg", "image/jpeg" },
		{ ".gif", "image/gif" },
		{ ".svg", "image/svg+xml" },
	};

	for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++) {
		size_t el = strlen(types[i].ext);

		if (len >= el && strncasecmp(name + len - el, types[i].ext, el) == 0)
			return types[i].type;
	}
	return "application/octet-stream";
}

static int handle_file(const struct request *req, struct response *resp)
{
	const char *name = req->path + strlen("/file/");
	size_t name_len = req->path_len - strlen("/file/");
	char path[PATH_MAX];
	struct stat st;
	char *data;
	size_t got = 0;
	int fd, n;

	if (name_len == 0) {
		set_static(resp, 404, "not found\n");
		return 0;
	}
	if (memmem(name, name_len, "..", 2) != NULL) {
		set_static(resp, 403, "forbidden\n");
		return 0;
	}
	n = snprintf(path, sizeof(path), "%s/%.*s", docroot, (int)name_len,
		     name);
	if (n < 0 || (size_t)n >= sizeof(path)) {
		set_static(resp, 414, "path too long\n");
		return 0;
	}

	/* O_NONBLOCK: opening a FIFO must not stall the whole server. */
	fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
	if (fd < 0) {
		if (errno == ENOENT || errno == ENOTDIR || errno == ENAMETOOLONG) {
			set_static(resp, 404, "not found\n");
			return 0;
		}
		if (errno == EACCES || errno == EPERM || errno == ELOOP) {
			set_static(resp, 403, "forbidden\n");
			return 0;
		}
		fprintf(stderr, "bugsrv: open %s: %s\n", path, strerror(errno));
		return -1;
	}
	if (fstat(fd, &st) < 0) {
		fprintf(stderr, "bugsrv: fstat %s: %s\n", path, strerror(errno));
		close(fd);
		return -1;
	}
	if (!S_ISREG(st.st_mode)) {
		close(fd);
		set_static(resp, 404, "not found\n");
		return 0;
	}

	data = malloc(st.st_size > 0 ? (size_t)st.st_size : 1);
	if (data == NULL) {
		close(fd);
		return -1;
	}
	/* A short file (truncated meanwhile) is served as what was read. */
	while (got < (size_t)st.st_size) {
		ssize_t r = read(fd, data + got, (size_t)st.st_size - got);

		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0) {
			fprintf(stderr, "bugsrv: read %s: %s\n", path,
				strerror(errno));
			free(data);
			close(fd);
			return -1;
		}
		if (r == 0)
			break;
		got += (size_t)r;
	}
	close(fd);
	set_owned(resp, 200, guess_type(name, name_len), data, got);
	return 0;
}

static int handle_bug(const struct request *req, struct response *resp)
{
	const char *what = req->path + strlen("/bug/");
	size_t what_len = req->path_len - strlen("/bug/");
	const char *v;
	size_t len, n;
	int rc;

	if (span_equals(what, what_len, "null")) {
		rc = bug_null_deref();
	} else if (span_equals(what, what_len, "div")) {
		char digits[16];
		char *end;
		long d;

		if (!query_param(req, "d", &v, &len) || len == 0 ||
		    len >= sizeof(digits)) {
			set_static(resp, 400, "expected /bug/div?d=INTEGER\n");
			return 0;
		}
		memcpy(digits, v, len);
		digits[len] = '\0';
		errno = 0;
		d = strtol(digits, &end, 10);
		if (errno != 0 || *end != '\0' || d < INT_MIN || d > INT_MAX) {
			set_static(resp, 400, "expected /bug/div?d=INTEGER\n");
			return 0;
		}
		return set_printf(resp, 200, "%d\n", bug_divide((int)d));
	} else if (span_equals(what, what_len, "heap")) {
		rc = bug_heap_overflow();
	} else if (span_equals(what, what_len, "stack")) {
		char *input;

		n = 200;
		if (query_param(req, "n", &v, &len) && !parse_size(v, len, &n)) {
			set_static(resp, 400, "expected /bug/stack?n=BYTES\n");
			return 0;
		}
		/* Bounded so an overflow reaches the canary, not the stack end. */
		if (n > 1024) {
			set_static(resp, 400, "n is limited to 1024\n");
			return 0;
		}
		input = malloc(n ? n : 1);
		if (input == NULL)
			return -1;
		memset(input, 'S', n);
		rc = bug_stack_smash(input, n);
		free(input);
	} else if (span_equals(what, what_len, "abort")) {
		rc = bug_assert();
	} else if (span_equals(what, what_len, "loop")) {
		rc = bug_infinite_loop();
	} else {
		set_static(resp, 404, "not found\n");
		return 0;
	}
	if (rc < 0)
		return -1;
	return set_printf(resp, 200, "%d\n", rc);
}

NOINLINE int process_request(struct request *req, struct response *resp)
{
	bool readonly = req->method == METHOD_GET || req->method == METHOD_HEAD;
	const char *p = req->path;
	size_t pl = req->path_len;
	int rc;

	if (readonly && span_equals(p, pl, "/")) {
		set_static(resp, 200, "hello from bugsrv\n");
		rc = 0;
	} else if ((readonly || req->method == METHOD_POST) &&
		   span_equals(p, pl, "/echo")) {
		rc = handle_echo(req, resp);
	} else if (readonly && span_equals(p, pl, "/big")) {
		rc = handle_big(req, resp);
	} else if (readonly && pl > strlen("/file/") &&
		   memcmp(p, "/file/", strlen("/file/")) == 0) {
		rc = handle_file(req, resp);
	} else if (readonly && span_equals(p, pl, "/count")) {
		rc = set_printf(resp, 200, "%lu\n", requests_served);
	} else if (readonly && span_equals(p, pl, "/shutdown")) {
		set_static(resp, 200, "bye\n");
		resp->close_after = true;
		resp->exit_after = true;
		rc = 0;
	} else if (readonly && pl > strlen("/bug/") &&
		   memcmp(p, "/bug/", strlen("/bug/")) == 0) {
		rc = handle_bug(req, resp);
	} else {
		set_static(resp, 404, "not found\n");
		rc = 0;
	}

	requests_served++;
	if (rc < 0) {
		response_release(resp);
		return -1;
	}
	return 0;
}

/* ------------------------------------------------------------------------ */
/* Parsing                                                                  */
/* ------------------------------------------------------------------------ */

static int parse_header_line(const char *line, size_t len, struct request *req,
			     bool *have_length)
{
	const char *colon = memchr(line, ':', len);
	const char *v, *vend = line + len;
	size_t name_len;

	if (colon == NULL || colon == line)
		return -1;
	name_len = (size_t)(colon - line);
	for (size_t i = 0; i < name_len; i++)
		if (!is_tchar((unsigned char)line[i]))
			return -1; /* also rejects obsolete line folding */
	v = colon + 1;
	while (v < vend && (*v == ' ' || *v == '\t'))
		v++;
	while (vend > v && (vend[-1] == ' ' || vend[-1] == '\t'))
		vend--;

	if (span_iequals(line, name_len, "Content-Length")) {
		size_t cl;

		if (!parse_size(v, (size_t)(vend - v), &cl))
			return -1;
		if (*have_length && cl != req->content_length)
			return -1;
		req->content_length = cl;
		*have_length = true;
	} else if (span_iequals(line, name_len, "Connection")) {
		if (header_has_token(v, (size_t)(vend - v), "close"))
			req->keep_alive = false;
		else if (header_has_token(v, (size_t)(vend - v), "keep-alive"))
			req->keep_alive = true;
	} else if (span_iequals(line, name_len, "Transfer-Encoding")) {
		req->error_status = 501;
		return -1;
	} else if (span_iequals(line, name_len, "Expect")) {
		if (span_iequals(v, (size_t)(vend - v), "100-continue"))
			req->expect_continue = true;
		else
			return -1;
	}
	return 0;
}

/*
 * Parses the request head in BUF. Returns 0 when the head is complete (the
 * body may still be in flight: see header_len and content_length), 1 when
 * more input is needed, -1 when the request is malformed; on -1,
 * req->error_status holds the status to answer with (400 if unset).
 */
NOINLINE int parse_request(const char *buf, size_t len, struct request *req)
{
	const char *head_end = find_crlfcrlf(buf, len < MAX_HEADER_BYTES ?
						     len : MAX_HEADER_BYTES);
	const char *line, *eol, *sp1, *sp2, *target, *qmark;
	bool have_length = false;
	size_t mlen, tlen;

	req->error_status = 400;
	if (head_end == NULL) {
		if (len >= MAX_HEADER_BYTES) {
			req->error_status = 431;
			return -1;
		}
		/* Reject garbage early instead of buffering up to the limit. */
		for (size_t i = 0; i < len && buf[i] != ' '; i++)
			if (!is_tchar((unsigned char)buf[i]))
				return -1;
		return 1;
	}
	req->header_len = (size_t)(head_end - buf) + 4;

	/* Request line: METHOD SP TARGET SP HTTP/1.x CRLF */
	eol = memmem(buf, req->header_len, "\r\n", 2);
	sp1 = memchr(buf, ' ', (size_t)(eol - buf));
	if (sp1 == NULL || sp1 == buf)
		return -1;
	mlen = (size_t)(sp1 - buf);
	for (size_t i = 0; i < mlen; i++)
		if (!is_tchar((unsigned char)buf[i]))
			return -1;
	if (span_equals(buf, mlen, "GET"))
		req->method = METHOD_GET;
	else if (span_equals(buf, mlen, "HEAD"))
		req->method = METHOD_HEAD;
	else if (span_equals(buf, mlen, "POST"))
		req->method = METHOD_POST;
	else
		req->method = METHOD_OTHER;

	target = sp1 + 1;
	sp2 = memchr(target, ' ', (size_t)(eol - target));
	if (sp2 == NULL || sp2 == target || *target != '/')
		return -1;
	tlen = (size_t)(sp2 - target);
	for (size_t i = 0; i < tlen; i++) {
		unsigned char c = (unsigned char)target[i];

		if (c <= 0x20 || c >= 0x7f)
			return -1;
	}
	if (span_equals(sp2 + 1, (size_t)(eol - sp2 - 1), "HTTP/1.1"))
		req->minor_version = 1;
	else if (span_equals(sp2 + 1, (size_t)(eol - sp2 - 1), "HTTP/1.0"))
		req->minor_version = 0;
	else
		return -1;
	req->keep_alive = req->minor_version == 1;

	qmark = memchr(target, '?', tlen);
	req->path = target;
	req->path_len = qmark ? (size_t)(qmark - target) : tlen;
	if (qmark) {
		req->query = qmark + 1;
		req->query_len = (size_t)(sp2 - qmark - 1);
	}

	/* Header fields, up to the blank line. */
	for (line = eol + 2; line < head_end + 2; line = eol + 2) {
		eol = memmem(line, (size_t)(head_end + 2 - line), "\r\n", 2);
		if (parse_header_line(line, (size_t)(eol - line), req,
				      &have_length) < 0)
			return -1;
	}
	if (req->expect_continue && req->minor_version == 0)
		req->expect_continue = false;
	req->body = buf + req->header_len;
	return 0;
}

/* ------------------------------------------------------------------------ */
/* Connections                                                              */
/* ------------------------------------------------------------------------ */

struct connection {
	int fd;
	uint32_t interest; /* events currently registered with epoll */

	char *in;
	size_t in_len, in_cap;
	bool peer_closed;
	bool sent_continue;

	/* One response in flight at a time; pipelined input waits. */
	bool out_pending;
	char head[512];
	size_t head_len, head_off;
	struct response resp;
	size_t body_off;
	bool send_body;
};

static int epfd = -1;
/* Any offset modulo 26 followed by a full chunk fits. */
#define PATTERN_CHUNK (26u * 10240u)
static char pattern[PATTERN_CHUNK + 26];

static void init_pattern(void)
{
	for (size_t i = 0; i < sizeof(pattern); i++)
		pattern[i] = (char)('a' + i % 26);
}

static void connection_close(struct connection *c)
{
	bool exit_after = c->resp.exit_after;

	/* Closing the fd removes it from the epoll set. */
	close(c->fd);
	response_release(&c->resp);
	free(c->in);
	free(c);
	if (exit_after)
		exit(0);
}

static int set_interest(struct connection *c, uint32_t events)
{
	struct epoll_event ev = { .events = events, .data.ptr = c };

	if (c->interest == events)
		return 0;
	if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0) {
		fprintf(stderr, "bugsrv: epoll_ctl: %s\n", strerror(errno));
		return -1;
	}
	c->interest = events;
	return 0;
}

static void queue_response(struct connection *c, struct response *resp,
			   bool head_only)
{
	int n;

	c->resp = *resp;
	n = snprintf(c->head, sizeof(c->head),
		     "HTTP/1.1 %d %s\r\n"
		     "Server: bugsrv\r\n"
		     "Content-Type: %s\r\n"
		     "Content-Length: %zu\r\n"
		     "Connection: %s\r\n"
		     "\r\n",
		     resp->status, status_text(resp->status),
		     resp->content_type ? resp->content_type : "text/plain",
		     resp->body_len, resp->close_after ? "close" : "keep-alive");
	c->head_len = (size_t)n < sizeof(c->head) ? (size_t)n : sizeof(c->head);
	c->head_off = 0;
	c->body_off = 0;
	c->send_body = !head_only;
	c->out_pending = true;
}

static void queue_interim_continue(struct connection *c)
{
	static const char line[] = "HTTP/1.1 100 Continue\r\n\r\n";

	memset(&c->resp, 0, sizeof(c->resp));
	memcpy(c->head, line, sizeof(line) - 1);
	c->head_len = sizeof(line) - 1;
	c->head_off = 0;
	c->body_off = 0;
	c->send_body = false;
	c->out_pending = true;
	c->sent_continue = true;
}

static void queue_error(struct connection *c, int status, const char *body)
{
	struct response resp = { 0 };

	set_static(&resp, status, body);
	resp.close_after = true;
	queue_response(c, &resp, false);
}

/* Returns 1 when everything was written, 0 when blocked, -1 on error. */
static int flush_output(struct connection *c)
{
	while (c->out_pending) {
		struct iovec iov[2];
		int cnt = 0;
		size_t body_left = c->send_body ? c->resp.body_len - c->body_off : 0;
		ssize_t n;

		if (c->head_off < c->head_len) {
			iov[cnt].iov_base = c->head + c->head_off;
			iov[cnt].iov_len = c->head_len - c->head_off;
			cnt++;
		}
		if (body_left > 0) {
			if (c->resp.body_kind == BODY_PATTERN) {
				iov[cnt].iov_base = pattern + c->body_off % 26;
				iov[cnt].iov_len = body_left < PATTERN_CHUNK ?
							   body_left :
							   PATTERN_CHUNK;
			} else {
				iov[cnt].iov_base = (char *)c->resp.body + c->body_off;
				iov[cnt].iov_len = body_left;
			}
			cnt++;
		}
		if (cnt == 0) {
			c->out_pending = false;
			response_release(&c->resp);
			break;
		}

		n = writev(c->fd, iov, cnt);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				return 0;
			return -1;
		}
		if ((size_t)n <= c->head_len - c->head_off) {
			c->head_off += (size_t)n;
		} else {
			c->body_off += (size_t)n - (c->head_len - c->head_off);
			c->head_off = c->head_len;
		}
	}
	return 1;
}

static void consume_input(struct connection *c, size_t n)
{
	memmove(c->in, c->in + n, c->in_len - n);
	c->in_len -= n;
	c->sent_continue = false;
}

/*
 * Serves every complete request in the input buffer, one response at a time.
 * Returns -1 when the connection must be closed now.
 */
NOINLINE int handle_connection_input(struct connection *c)
{
	for (;;) {
		int rc;

		while (!c->out_pending && c->in_len > 0) {
			struct request req = { 0 };
			struct response resp = { 0 };
			bool head_only;

			rc = parse_request(c->in, c->in_len, &req);
			if (rc == 1)
				break;
			if (rc < 0) {
				if (req.error_status == 431)
					queue_error(c, 431,
						    "request header too large\n");
				else if (req.error_status == 501)
					queue_error(c, 501,
						    "transfer coding not supported\n");
				else
					queue_error(c, 400, "bad request\n");
				break;
			}
			if (req.content_length > MAX_BODY_BYTES) {
				queue_error(c, 413, "request body too large\n");
				break;
			}
			if (c->in_len - req.header_len < req.content_length) {
				if (req.expect_continue && !c->sent_continue)
					queue_interim_continue(c);
				break;
			}

			head_only = req.method == METHOD_HEAD;
			if (process_request(&req, &resp) < 0) {
				queue_error(c, 500, "internal server error\n");
				break;
			}
			if (!req.keep_alive)
				resp.close_after = true;
			consume_input(c, req.header_len + req.content_length);
			queue_response(c, &resp, head_only);
		}

		if (!c->out_pending)
			break;
		rc = flush_output(c);
		if (rc < 0)
			return -1;
		if (rc == 0)
			return set_interest(c, EPOLLOUT);
		if (c->resp.close_after)
			return -1; /* exit_after is honoured by connection_close() */
		/* Drained: further pipelined requests may be buffered. */
	}
	if (c->peer_closed)
		return -1;
	return set_interest(c, EPOLLIN | EPOLLRDHUP);
}

/* Returns -1 on a fatal connection error. */
static int read_input(struct connection *c)
{
	while (c->in_len < INPUT_MAX_CAP) {
		ssize_t n;

		if (c->in_len == c->in_cap) {
			size_t cap = c->in_cap * 2;
			char *p;

			if (cap > INPUT_MAX_CAP)
				cap = INPUT_MAX_CAP;
			p = realloc(c->in, cap);
			if (p == NULL)
				return -1;
			c->in = p;
			c->in_cap = cap;
		}
		n = read(c->fd, c->in + c->in_len, c->in_cap - c->in_len);
		if (n > 0) {
			c->in_len += (size_t)n;
			continue;
		}
		if (n == 0) {
			c->peer_closed = true;
			return 0;
		}
		if (errno == EINTR)
			continue;
		if (errno == EAGAIN || errno == EWOULDBLOCK)
			return 0;
		if (errno != ECONNRESET)
			fprintf(stderr, "bugsrv: read: %s\n", strerror(errno));
		return -1;
	}
	return 0;
}

static void connection_event(struct connection *c, uint32_t events)
{
	if (events & EPOLLERR) {
		connection_close(c);
		return;
	}
	if (c->out_pending && (events & (EPOLLOUT | EPOLLHUP))) {
		int rc = flush_output(c);

		if (rc < 0 || (rc == 1 && c->resp.close_after)) {
			connection_close(c);
			return;
		}
		if (rc == 0)
			return;
	}
	if (!c->out_pending && (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP))) {
		if (read_input(c) < 0) {
			connection_close(c);
			return;
		}
	}
	if (handle_connection_input(c) < 0)
		connection_close(c);
}

static void accept_connections(int lfd)
{
	const int one = 1;

	for (;;) {
		struct epoll_event ev;
		struct connection *c;
		int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);

		if (fd < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			if (errno != EAGAIN && errno != EWOULDBLOCK)
				fprintf(stderr, "bugsrv: accept4: %s\n",
					strerror(errno));
			return;
		}
		c = calloc(1, sizeof(*c));
		if (c != NULL)
			c->in = malloc(INPUT_INITIAL_CAP);
		if (c == NULL || c->in == NULL) {
			fprintf(stderr, "bugsrv: out of memory for connection\n");
			if (c != NULL)
				free(c);
			close(fd);
			continue;
		}
		/*
		 * Responses go out as one writev per chunk; without this the
		 * short tail of a body waits for the peer's delayed ACK.
		 */
		if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) < 0)
			fprintf(stderr, "bugsrv: setsockopt(TCP_NODELAY): %s\n",
				strerror(errno));
		c->fd = fd;
		c->in_cap = INPUT_INITIAL_CAP;
		c->interest = EPOLLIN | EPOLLRDHUP;
		ev.events = c->interest;
		ev.data.ptr = c;
		if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
			fprintf(stderr, "bugsrv: epoll_ctl: %s\n", strerror(errno));
			free(c->in);
			free(c);
			close(fd);
		}
	}
}

/* ------------------------------------------------------------------------ */
/* Startup                                                                  */
/* ------------------------------------------------------------------------ */

static void usage(FILE *out)
{
	fprintf(out, "usage: bugsrv [-a ADDR] [-p PORT] [-d DOCROOT]\n"
		     "  -a ADDR     IPv4 address to listen on (default 127.0.0.1)\n"
		     "  -p PORT     TCP port, 0 for an ephemeral port (default 8080)\n"
		     "  -d DOCROOT  directory served under /file/ (default /www)\n");
}

static int open_listener(const char *addr_text, int port)
{
	struct sockaddr_in addr = { .sin_family = AF_INET };
	socklen_t addr_len = sizeof(addr);
	struct epoll_event ev = { .events = EPOLLIN, .data.ptr = NULL };
	char shown[INET_ADDRSTRLEN];
	int one = 1;
	int fd;

	if (inet_pton(AF_INET, addr_text, &addr.sin_addr) != 1) {
		fprintf(stderr, "bugsrv: invalid IPv4 address '%s'\n", addr_text);
		exit(2);
	}
	addr.sin_port = htons((uint16_t)port);

	fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		perror("bugsrv: socket");
		return -1;
	}
	if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0) {
		perror("bugsrv: setsockopt(SO_REUSEADDR)");
		return -1;
	}
	if (bind(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
		fprintf(stderr, "bugsrv: bind %s:%d: %s\n", addr_text, port,
			strerror(errno));
		return -1;
	}
	if (listen(fd, SOMAXCONN) < 0) {
		perror("bugsrv: listen");
		return -1;
	}
	if (getsockname(fd, (struct sockaddr *)&addr, &addr_len) < 0) {
		perror("bugsrv: getsockname");
		return -1;
	}
	if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
		perror("bugsrv: epoll_ctl");
		return -1;
	}
	inet_ntop(AF_INET, &addr.sin_addr, shown, sizeof(shown));
	printf("bugsrv: listening on %s:%u\n", shown, ntohs(addr.sin_port));
	fflush(stdout);
	return fd;
}

int main(int argc, char **argv)
{
	const char *addr = "127.0.0.1";
	struct epoll_event events[MAX_EVENTS];
	struct sigaction sa = { .sa_handler = SIG_IGN };
	long port = 8080;
	char *end;
	int opt, lfd;

	while ((opt = getopt(argc, argv, "a:p:d:h")) != -1) {
		switch (opt) {
		case 'a':
			addr = optarg;
			break;
		case 'p':
			errno = 0;
			port = strtol(optarg, &end, 10);
			if (errno != 0 || *optarg == '\0' || *end != '\0' ||
			    port < 0 || port > 65535) {
				fprintf(stderr, "bugsrv: invalid port '%s'\n",
					optarg);
				return 2;
			}
			break;
		case 'd':
			docroot = optarg;
			break;
		case 'h':
			usage(stdout);
			return 0;
		default:
			usage(stderr);
			return 2;
		}
	}
	if (optind != argc) {
		fprintf(stderr, "bugsrv: unexpected argument '%s'\n", argv[optind]);
		usage(stderr);
		return 2;
	}

	/* A peer that goes away mid-response must not kill the server. */
	sigaction(SIGPIPE, &sa, NULL);
	init_pattern();

	epfd = epoll_create1(EPOLL_CLOEXEC);
	if (epfd < 0) {
		perror("bugsrv: epoll_create1");
		return 1;
	}
	lfd = open_listener(addr, (int)port);
	if (lfd < 0)
		return 1;

	for (;;) {
		int n = epoll_wait(epfd, events, MAX_EVENTS, -1);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			perror("bugsrv: epoll_wait");
			return 1;
		}
		for (int i = 0; i < n; i++) {
			if (events[i].data.ptr == NULL)
				accept_connections(lfd);
			else
				connection_event(events[i].data.ptr,
						 events[i].events);
		}
	}
}

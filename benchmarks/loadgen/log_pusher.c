/*
 * Log load: CONNS connections each send LINES lines of SIZE bytes (newline included), as fast
 * as the server takes them; the clock stops when FILE holds at least EXPECTED bytes, i.e. when
 * every line is visible to a reader such as `tail -f`. Bounded by TIMEOUT_MS.
 * Prints one JSON object: lines/s and MiB/s until visible, and when the sending finished.
 *
 * usage: log_pusher PORT CONNS LINES SIZE FILE EXPECTED_BYTES TIMEOUT_MS
 */
#include "common.h"

#define LINES_PER_CHUNK 512

typedef struct {
    int fd;
    long lines_left; /* lines not yet queued into the chunk */
    long offset, length;
    char *chunk;
} conn_t;

static void fill(conn_t *c, int id, long size) {
    long lines = c->lines_left < LINES_PER_CHUNK ? c->lines_left : LINES_PER_CHUNK;
    for (long i = 0; i < lines; i++) {
        char *line = c->chunk + i * size;
        memset(line, 'x', (size_t)size);
        long seq = c->lines_left - i;
        char head[32];
        int len = snprintf(head, sizeof head, "c%03d %09ld ", id, seq);
        memcpy(line, head, (size_t)(len < size - 1 ? len : size - 1));
        line[size - 1] = '\n';
    }
    c->lines_left -= lines;
    c->offset = 0;
    c->length = lines * size;
}

static long file_size(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 ? (long)st.st_size : 0;
}

int main(int argc, char **argv) {
    if (argc != 8) {
        fprintf(stderr, "usage: log_pusher PORT CONNS LINES SIZE FILE EXPECTED_BYTES TIMEOUT_MS\n");
        return 2;
    }
    int port = (int)arg_long(argv, 1, "PORT");
    int nconns = (int)arg_long(argv, 2, "CONNS");
    long lines = arg_long(argv, 3, "LINES"), size = arg_long(argv, 4, "SIZE");
    const char *path = argv[5];
    long expected = arg_long(argv, 6, "EXPECTED_BYTES");
    double timeout = (double)arg_long(argv, 7, "TIMEOUT_MS") / 1000.0;
    if (size < 2 || nconns < 1) { fprintf(stderr, "loadgen: SIZE >= 2, CONNS >= 1\n"); return 2; }
    raise_nofile();
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) die("epoll_create1");
    int *fds = connect_many(port, nconns, 10.0);
    conn_t *conns = calloc((size_t)nconns, sizeof(conn_t));
    for (int i = 0; i < nconns; i++) {
        conns[i].fd = fds[i];
        conns[i].lines_left = lines;
        conns[i].chunk = malloc((size_t)(LINES_PER_CHUNK * size));
        if (!conns[i].chunk) die("malloc");
        fill(&conns[i], i, size);
        struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = &conns[i]};
        epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &ev);
    }
    double start = now_s(), deadline = start + timeout, sent_at = 0;
    int sending = nconns, errors = 0;
    struct epoll_event events[64];
    while (sending > 0 && now_s() < deadline) {
        int n = epoll_wait(ep, events, 64, 100);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int e = 0; e < n; e++) {
            conn_t *c = events[e].data.ptr;
            for (;;) {
                if (c->offset == c->length) {
                    if (c->lines_left == 0) {
                        epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                        sending--;
                        break;
                    }
                    fill(c, (int)(c - conns), size);
                }
                ssize_t put = send(c->fd, c->chunk + c->offset, (size_t)(c->length - c->offset),
                                   MSG_NOSIGNAL);
                if (put < 0) {
                    if (errno != EAGAIN) {
                        errors++;
                        epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                        sending--;
                    }
                    break;
                }
                c->offset += put;
            }
        }
    }
    sent_at = now_s() - start;
    long have = 0;
    while ((have = file_size(path)) < expected && now_s() < deadline) usleep(500);
    double visible = now_s() - start;
    for (int i = 0; i < nconns; i++) close(conns[i].fd);
    int complete = have >= expected;
    double total_lines = (double)lines * nconns;
    printf("{\"lines\": %.0f, \"sent_s\": %.4f, \"visible_s\": %.4f, \"lines_per_s\": %.1f, "
           "\"mib_per_s\": %.2f, \"file_bytes\": %ld, \"expected_bytes\": %ld, \"complete\": %s, "
           "\"errors\": %d}\n",
           total_lines, sent_at, visible, complete ? total_lines / visible : 0.0,
           complete ? total_lines * size / visible / 1048576.0 : 0.0, have, expected,
           complete ? "true" : "false", errors);
    return complete && !errors ? 0 : 1;
}

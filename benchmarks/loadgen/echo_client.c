/*
 * Echo request/response load: CONNS connections each send a SIZE-byte message, wait for all
 * of it to come back, and repeat, for WARMUP + DURATION milliseconds (only DURATION counted).
 * Prints one JSON object: messages/s, MiB/s echoed, p50/p99 round-trip latency.
 *
 * usage: echo_client PORT CONNS SIZE DURATION_MS WARMUP_MS
 */
#include "common.h"

#define MAX_LATENCY_US 2000000

typedef struct {
    int fd;
    long sent, received;
    double started;
    int writing;
} conn_t;

static unsigned *histogram;

static long percentile(long total, double fraction) {
    long want = (long)(total * fraction), seen = 0;
    for (long us = 0; us <= MAX_LATENCY_US; us++) {
        seen += histogram[us];
        if (seen > want) return us;
    }
    return MAX_LATENCY_US;
}

static void set_events(int ep, conn_t *c, int writing) {
    if (c->writing == writing) return;
    struct epoll_event ev = {.events = EPOLLIN | (writing ? EPOLLOUT : 0), .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
    c->writing = writing;
}

static int pump_send(int ep, conn_t *c, const char *message, long size) {
    while (c->sent < size) {
        ssize_t n = send(c->fd, message + c->sent, (size_t)(size - c->sent), MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN) break;
            return -1;
        }
        c->sent += n;
    }
    set_events(ep, c, c->sent < size);
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: echo_client PORT CONNS SIZE DURATION_MS WARMUP_MS\n");
        return 2;
    }
    int port = (int)arg_long(argv, 1, "PORT");
    int nconns = (int)arg_long(argv, 2, "CONNS");
    long size = arg_long(argv, 3, "SIZE");
    double duration = (double)arg_long(argv, 4, "DURATION_MS") / 1000.0;
    double warmup = (double)arg_long(argv, 5, "WARMUP_MS") / 1000.0;
    if (nconns < 1 || size < 1) { fprintf(stderr, "loadgen: CONNS and SIZE must be >= 1\n"); return 2; }
    raise_nofile();
    histogram = calloc(MAX_LATENCY_US + 1, sizeof(unsigned));
    char *message = malloc((size_t)size), *scratch = malloc(262144);
    if (!histogram || !message || !scratch) die("malloc");
    for (long i = 0; i < size; i++) message[i] = (char)('a' + i % 26);

    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) die("epoll_create1");
    int *fds = connect_many(port, nconns, 10.0);
    conn_t *conns = calloc((size_t)nconns, sizeof(conn_t));
    double start = now_s(), counting_from = start + warmup, deadline = counting_from + duration;
    for (int i = 0; i < nconns; i++) {
        conns[i].fd = fds[i];
        conns[i].writing = 0;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &conns[i]};
        epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &ev);
        conns[i].started = now_s();
        if (pump_send(ep, &conns[i], message, size) < 0) die("send");
    }
    long messages = 0, errors = 0, open_conns = nconns;
    double bytes = 0;
    struct epoll_event events[256];
    while (open_conns > 0) {
        double now = now_s();
        if (now >= deadline) break;
        int n = epoll_wait(ep, events, 256, (int)((deadline - now) * 1000) + 1);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int e = 0; e < n; e++) {
            conn_t *c = events[e].data.ptr;
            if (c->fd < 0) continue;
            if (events[e].events & EPOLLOUT) {
                if (pump_send(ep, c, message, size) < 0) goto broken;
            }
            if (events[e].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) {
                for (;;) {
                    ssize_t got = recv(c->fd, scratch, 262144, 0);
                    if (got == 0) goto broken;
                    if (got < 0) {
                        if (errno == EAGAIN) break;
                        goto broken;
                    }
                    c->received += got;
                    if (c->received >= size) break;
                }
                if (c->received > size) goto broken; /* more than sent: not an echo */
                if (c->received == size) {
                    double done = now_s();
                    if (done >= counting_from && done < deadline) {
                        long us = (long)((done - c->started) * 1e6);
                        histogram[us > MAX_LATENCY_US ? MAX_LATENCY_US : us]++;
                        messages++;
                        bytes += (double)size;
                    }
                    c->sent = c->received = 0;
                    c->started = done;
                    if (pump_send(ep, c, message, size) < 0) goto broken;
                }
            }
            continue;
        broken:
            errors++;
            open_conns--;
            close(c->fd);
            c->fd = -1;
        }
    }
    double counted = now_s() - counting_from;
    if (counted > duration) counted = duration;
    if (counted <= 0) counted = 1e-9;
    printf("{\"messages\": %ld, \"seconds\": %.4f, \"msgs_per_s\": %.1f, \"mib_per_s\": %.2f, "
           "\"p50_us\": %ld, \"p99_us\": %ld, \"errors\": %ld}\n",
           messages, counted, messages / counted, bytes / counted / 1048576.0,
           percentile(messages, 0.50), percentile(messages, 0.99), errors);
    return errors ? 1 : 0;
}

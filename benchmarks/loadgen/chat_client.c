/*
 * Chat broadcast load: CLIENTS connect (a few at a time), wait until the join announcements
 * are over (no input for QUIET_MS), then clients 0..SENDERS-1 each send LINES lines of about
 * SIZE bytes ("BENCH sender seq xxxx" + CR LF). Every client counts the BENCH lines of the
 * other senders it receives (a sender's own line coming back is not a delivery). A sender keeps
 * at most WINDOW lines ahead of what the last client (an observer that never sends) has seen,
 * so the run measures delivery, not how much the server can buffer.
 * Stops when every expected delivery arrived or after TIMEOUT_MS. Prints one JSON object.
 *
 * usage: chat_client PORT CLIENTS SENDERS LINES SIZE WINDOW QUIET_MS TIMEOUT_MS
 */
#include "common.h"


typedef struct {
    int fd, id, closed, wants_out;
    long sent_lines; /* senders only */
    long out_offset, out_length;
    char out[8192];
    carry_t carry;
    long delivered;
} client_t;

static long *observer_seen; /* per sender: 1 + highest sequence the observer received */
static long nlines, line_size, window;
static int nsenders, observer;

static long digits(const char *text, int count) {
    long value = 0;
    for (int i = 0; i < count; i++) {
        if (text[i] < '0' || text[i] > '9') return -1;
        value = value * 10 + (text[i] - '0');
    }
    return value;
}

/* One received line: counts it when it is another client's BENCH line. */
static void handle_line(void *ctx, const char *line, long len) {
    client_t *c = ctx;
    const char *mark = memmem(line, (size_t)len, "BENCH ", 6);
    if (!mark || line + len - mark < 22) return;
    long sender = digits(mark + 6, 5);
    if (sender < 0 || sender == c->id || sender >= nsenders) return;
    c->delivered++;
    if (c->id == observer) {
        long seq = digits(mark + 12, 9);
        if (seq + 1 > observer_seen[sender]) observer_seen[sender] = seq + 1;
    }
}


/* Queue and send as many lines as the window allows; -1 on a broken connection. */
static int pump(int ep, client_t *c) {
    for (;;) {
        if (c->out_offset == c->out_length) {
            c->out_offset = c->out_length = 0;
            while (c->sent_lines < nlines && c->sent_lines - observer_seen[c->id] < window &&
                   c->out_length + line_size <= (long)sizeof c->out) {
                char *line = c->out + c->out_length;
                memset(line, 'x', (size_t)line_size);
                int len = snprintf(line, (size_t)line_size, "BENCH %05d %09ld ", c->id, c->sent_lines);
                line[len] = 'x';
                line[line_size - 2] = '\r';
                line[line_size - 1] = '\n';
                c->out_length += line_size;
                c->sent_lines++;
            }
            if (c->out_length == 0) break;
        }
        ssize_t put = send(c->fd, c->out + c->out_offset, (size_t)(c->out_length - c->out_offset),
                           MSG_NOSIGNAL);
        if (put < 0) {
            if (errno == EAGAIN) break;
            return -1;
        }
        c->out_offset += put;
    }
    int wants_out = c->out_offset < c->out_length;
    if (wants_out == c->wants_out) return 0;
    c->wants_out = wants_out;
    uint32_t want = EPOLLIN | (wants_out ? EPOLLOUT : 0);
    struct epoll_event ev = {.events = want, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 9) {
        fprintf(stderr, "usage: chat_client PORT CLIENTS SENDERS LINES SIZE WINDOW QUIET_MS TIMEOUT_MS\n");
        return 2;
    }
    int port = (int)arg_long(argv, 1, "PORT");
    int nclients = (int)arg_long(argv, 2, "CLIENTS");
    nsenders = (int)arg_long(argv, 3, "SENDERS");
    nlines = arg_long(argv, 4, "LINES");
    line_size = arg_long(argv, 5, "SIZE");
    window = arg_long(argv, 6, "WINDOW");
    double quiet = (double)arg_long(argv, 7, "QUIET_MS") / 1000.0;
    double timeout = (double)arg_long(argv, 8, "TIMEOUT_MS") / 1000.0;
    if (nclients <= nsenders || nsenders < 1 || line_size < 32 || line_size > 4096 || window < 1) {
        fprintf(stderr, "loadgen: need CLIENTS > SENDERS >= 1, 32 <= SIZE <= 4096, WINDOW >= 1\n");
        return 2;
    }
    observer = nclients - 1;
    observer_seen = calloc((size_t)nsenders, sizeof(long));
    raise_nofile();
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) die("epoll_create1");
    double begin = now_s(), deadline = begin + timeout;
    client_t *clients = calloc((size_t)nclients, sizeof(client_t));
    if (!clients) die("calloc");
    static char scratch[262144];
    struct epoll_event events[512];
    double last_input = now_s();
    long delivered = 0, expected = (long)nsenders * nlines * (nclients - 1);
    int closed = 0, started = 0;
    double t0 = 0, t_last = 0;

    /* Connect (waiting for each welcome), then wait until the join announcements are over. */
    int *fds = connect_many_greeted(port, nclients, 1, 10.0);
    for (int i = 0; i < nclients; i++) {
        clients[i].id = i;
        clients[i].fd = fds[i];
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &clients[i]};
        epoll_ctl(ep, EPOLL_CTL_ADD, clients[i].fd, &ev);
    }
    last_input = now_s();
    for (;;) {
        double now = now_s();
        if (now - last_input >= quiet || now >= deadline) break;
        int n = epoll_wait(ep, events, 512, 20);
        for (int e = 0; e < n; e++) {
            client_t *c = events[e].data.ptr;
            ssize_t got = recv(c->fd, scratch, sizeof scratch, 0);
            if (got > 0) last_input = now_s();
            if (got == 0) { fprintf(stderr, "loadgen: client %d closed while joining\n", c->id); return 3; }
        }
    }
    double joined_s = now_s() - begin;

    t0 = t_last = now_s();
    started = 1;
    for (int s = 0; s < nsenders; s++)
        if (pump(ep, &clients[s]) < 0) die("send");
    while (delivered < expected && now_s() < deadline && closed < nclients) {
        double now = now_s();
        int n = epoll_wait(ep, events, 512, (int)((deadline - now) * 1000) + 1);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int e = 0; e < n; e++) {
            client_t *c = events[e].data.ptr;
            if (c->closed) continue;
            if (events[e].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) {
                for (;;) {
                    ssize_t got = recv(c->fd, scratch, sizeof scratch, 0);
                    if (got > 0) {
                        long before = c->delivered;
                        split_lines(&c->carry, scratch, got, handle_line, c);
                        delivered += c->delivered - before;
                        if (c->delivered > before) t_last = now_s();
                        if (got < (ssize_t)sizeof scratch) break;
                        continue;
                    }
                    if (got < 0 && errno == EAGAIN) break;
                    c->closed = 1;
                    closed++;
                    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                    break;
                }
                if (c->id == observer)
                    for (int s = 0; s < nsenders; s++)
                        if (!clients[s].closed && pump(ep, &clients[s]) < 0) {
                            clients[s].closed = 1;
                            closed++;
                        }
            }
            if (!c->closed && (events[e].events & EPOLLOUT) && c->id < nsenders && pump(ep, c) < 0) {
                c->closed = 1;
                closed++;
            }
        }
    }
    (void)started;
    double elapsed = t_last - t0;
    if (elapsed <= 0) elapsed = 1e-9;
    printf("{\"clients\": %d, \"senders\": %d, \"delivered\": %ld, \"expected\": %ld, "
           "\"seconds\": %.4f, \"deliveries_per_s\": %.1f, \"join_s\": %.3f, \"closed\": %d, "
           "\"complete\": %s}\n",
           nclients, nsenders, delivered, expected, elapsed, delivered / elapsed, joined_s, closed,
           delivered >= expected ? "true" : "false");
    return delivered >= expected && !closed ? 0 : 1;
}

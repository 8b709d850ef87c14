/*
 * Chat latency and throughput over one or several servers of one room (issue 13): CLIENTS
 * connect round-robin to the comma-separated PORTS, wait until the join announcements are over
 * (no input for QUIET_MS), then clients 0..SENDERS-1 send lines of SIZE bytes
 * ("BENCH sender seq sent_ns xxx" + CR LF) for SECONDS:
 *
 * - RATE > 0: each sender sends RATE lines/s, the senders' ticks spread evenly over a period;
 * - RATE = 0: saturated; each sender keeps at most WINDOW lines ahead of what the observer (the
 *   last client) has seen, so the run measures delivery, not how much the servers buffer.
 *
 * Every client notes the latency (now - sent_ns, one monotonic clock on one machine) of each
 * other sender's line it receives: with several ports only lines from a sender on another
 * server count for the latency, all count as deliveries. After SECONDS the senders stop and
 * what is still under way is drained (up to 2 s). Prints one JSON object.
 *
 * usage: chat_spread PORTS CLIENTS SENDERS RATE SECONDS SIZE WINDOW QUIET_MS
 */
#include "common.h"

#define MAX_PORTS 8
#define BUCKETS 2000000 /* latency histogram: 1 us buckets up to 2 s */
#define DRAIN_S 2.0

typedef struct {
    int fd, id, server, closed, wants_out;
    long sent_lines; /* senders only */
    double next_send;
    long out_offset, out_length;
    char out[8192];
    carry_t carry;
} client_t;

static client_t *clients;
static long *observer_seen; /* per sender: 1 + highest sequence the observer received */
static unsigned *histogram;
static long samples, over, delivered, line_size, window;
static int nsenders, nports, observer, saturated;
static long rate_per_sender; /* lines/s, 1 when saturated (unused then) */

static double cpu_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static long digits(const char *text, int count) {
    long value = 0;
    for (int i = 0; i < count; i++) {
        if (text[i] < '0' || text[i] > '9') return -1;
        value = value * 10 + (text[i] - '0');
    }
    return value;
}

/* "BENCH sssss qqqqqqqqq nnnnnnnnnnnnnnnnnnn x...": sender, sequence, send time in ns. */
static long long arrived; /* when the data being split was received */

static void handle_line(void *ctx, const char *line, long len) {
    client_t *c = ctx;
    long long now = arrived;
    const char *mark = memmem(line, (size_t)len, "BENCH ", 6);
    if (!mark || line + len - mark < 42) return;
    long sender = digits(mark + 6, 5);
    if (sender < 0 || sender == c->id || sender >= nsenders) return;
    delivered++;
    if (c->id == observer) {
        long seq = digits(mark + 12, 9);
        if (seq + 1 > observer_seen[sender]) observer_seen[sender] = seq + 1;
    }
    if (nports > 1 && clients[sender].server == c->server) return;
    long long sent = 0;
    for (int i = 22; i < 41; i++) sent = sent * 10 + (mark[i] - '0');
    long long us = (now - sent) / 1000;
    samples++;
    if (us < 0) us = 0;
    if (us >= BUCKETS) over++;
    else histogram[us]++;
}


static void add_line(client_t *c) {
    char *line = c->out + c->out_length;
    memset(line, 'x', (size_t)line_size);
    int len = snprintf(line, (size_t)line_size, "BENCH %05d %09ld %019lld ", c->id, c->sent_lines,
                       now_ns());
    line[len] = 'x';
    line[line_size - 2] = '\r';
    line[line_size - 1] = '\n';
    c->out_length += line_size;
    c->sent_lines++;
}

/* Queue what is due (paced) or what the window allows (saturated), send it; -1 when broken. */
static int pump(int ep, client_t *c, int sending) {
    for (;;) {
        if (c->out_offset == c->out_length) {
            c->out_offset = c->out_length = 0;
            double now = now_s();
            while (sending && c->out_length + line_size <= (long)sizeof c->out) {
                if (saturated) {
                    if (c->sent_lines - observer_seen[c->id] >= window) break;
                } else {
                    if (now < c->next_send) break;
                    c->next_send += 1.0 / (double)rate_per_sender;
                }
                add_line(c);
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
    struct epoll_event ev = {.events = EPOLLIN | (wants_out ? EPOLLOUT : 0), .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
    return 0;
}

static double percentile_ms(double fraction) {
    long wanted = (long)(fraction * (double)samples), seen = 0;
    if (samples == 0) return -1;
    for (long us = 0; us < BUCKETS; us++) {
        seen += histogram[us];
        if (seen > wanted) return (double)us / 1000.0;
    }
    return (double)BUCKETS / 1000.0;
}

int main(int argc, char **argv) {
    if (argc != 9) {
        fprintf(stderr, "usage: chat_spread PORTS CLIENTS SENDERS RATE SECONDS SIZE WINDOW QUIET_MS\n");
        return 2;
    }
    int ports[MAX_PORTS];
    for (char *p = argv[1], *next; *p; p = next) {
        long port = strtol(p, &next, 10);
        if (next == p || port <= 0 || port > 65535 || nports == MAX_PORTS) {
            fprintf(stderr, "loadgen: PORTS is a comma-separated list of up to %d ports\n", MAX_PORTS);
            return 2;
        }
        ports[nports++] = (int)port;
        if (*next == ',') next++;
    }
    int nclients = (int)arg_long(argv, 2, "CLIENTS");
    nsenders = (int)arg_long(argv, 3, "SENDERS");
    long rate = arg_long(argv, 4, "RATE");
    double seconds = (double)arg_long(argv, 5, "SECONDS");
    line_size = arg_long(argv, 6, "SIZE");
    window = arg_long(argv, 7, "WINDOW");
    double quiet = (double)arg_long(argv, 8, "QUIET_MS") / 1000.0;
    if (nclients <= nsenders || nsenders < 1 || nsenders > 99999 || line_size < 64 ||
        line_size > 4096 || window < 1 || nclients < nports) {
        fprintf(stderr, "loadgen: need CLIENTS > SENDERS >= 1, CLIENTS >= ports, 64 <= SIZE <= 4096, WINDOW >= 1\n");
        return 2;
    }
    saturated = rate == 0;
    rate_per_sender = rate ? rate : 1;
    observer = nclients - 1;
    observer_seen = calloc((size_t)nsenders, sizeof(long));
    histogram = calloc(BUCKETS, sizeof(unsigned));
    clients = calloc((size_t)nclients, sizeof(client_t));
    if (!observer_seen || !histogram || !clients) die("calloc");
    raise_nofile();
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) die("epoll_create1");
    static char scratch[262144];
    struct epoll_event events[512];

    double begin = now_s();
    for (int s = 0; s < nports; s++) {
        int count = (nclients - s + nports - 1) / nports;
        int *fds = connect_many_greeted(ports[s], count, 1, 10.0);
        for (int k = 0; k < count; k++) {
            client_t *c = &clients[k * nports + s];
            c->id = k * nports + s;
            c->server = s;
            c->fd = fds[k];
            struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
            epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
        }
        free(fds);
    }
    double last_input = now_s();
    for (;;) {
        double now = now_s();
        if (now - last_input >= quiet || now - begin > 60) break;
        int n = epoll_wait(ep, events, 512, 20);
        for (int e = 0; e < n; e++) {
            client_t *c = events[e].data.ptr;
            ssize_t got = recv(c->fd, scratch, sizeof scratch, 0);
            if (got > 0) last_input = now_s();
            if (got == 0) {
                fprintf(stderr, "loadgen: client %d closed while joining\n", c->id);
                return 3;
            }
        }
    }
    double joined_s = now_s() - begin;

    /* The harness measures the servers' CPU between these two lines. */
    fprintf(stderr, "sending\n");
    fflush(stderr);
    double cpu0 = cpu_s();
    double t0 = now_s(), stop = t0 + seconds, drained = stop + DRAIN_S, own_cpu = 0;
    for (int s = 0; s < nsenders; s++) clients[s].next_send = t0 + (double)s / ((double)nsenders * (double)rate_per_sender);
    long at_stop = 0, sent = 0;
    int closed = 0, sending = 1;
    for (;;) {
        double now = now_s();
        if (sending && now >= stop) {
            sending = 0;
            at_stop = delivered;
            own_cpu = cpu_s() - cpu0;
            fprintf(stderr, "stopped\n");
            fflush(stderr);
            for (int s = 0; s < nsenders; s++) sent += clients[s].sent_lines;
        }
        if (!sending && (now >= drained || delivered >= sent * (nclients - 1))) break;
        int timeout_ms = saturated ? 5 : 1;
        int n = epoll_wait(ep, events, 512, timeout_ms);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        arrived = now_ns();
        for (int e = 0; e < n; e++) {
            client_t *c = events[e].data.ptr;
            if (c->closed) continue;
            if (events[e].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) {
                for (;;) {
                    ssize_t got = recv(c->fd, scratch, sizeof scratch, 0);
                    if (got > 0) {
                        split_lines(&c->carry, scratch, got, handle_line, c);
                        if (got < (ssize_t)sizeof scratch) break;
                        continue;
                    }
                    if (got < 0 && errno == EAGAIN) break;
                    c->closed = 1;
                    closed++;
                    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                    break;
                }
            }
            if (!c->closed && (events[e].events & EPOLLOUT) && c->id < nsenders &&
                pump(ep, c, sending) < 0) {
                c->closed = 1;
                closed++;
            }
        }
        for (int s = 0; s < nsenders && sending; s++)
            if (!clients[s].closed && !clients[s].wants_out && pump(ep, &clients[s], 1) < 0) {
                clients[s].closed = 1;
                closed++;
            }
    }
    printf("{\"clients\": %d, \"servers\": %d, \"senders\": %d, \"rate\": %ld, \"sent\": %ld, "
           "\"delivered\": %ld, \"expected\": %ld, \"seconds\": %.3f, \"deliveries_per_s\": %.1f, "
           "\"samples\": %ld, \"p50_ms\": %.3f, \"p99_ms\": %.3f, \"p999_ms\": %.3f, "
           "\"over_2s\": %ld, \"join_s\": %.3f, \"closed\": %d, \"loadgen_cpu_s\": %.2f}\n",
           nclients, nports, nsenders, rate, sent, delivered, sent * (nclients - 1), seconds,
           (double)at_stop / seconds, samples, percentile_ms(0.5), percentile_ms(0.99),
           percentile_ms(0.999), over, joined_s, closed, own_cpu);
    return closed ? 1 : 0;
}

/* Shared helpers for the twistnet load generators: loopback only, non-blocking, bounded. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static inline double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static inline void die(const char *what) {
    fprintf(stderr, "loadgen: %s: %s\n", what, strerror(errno));
    exit(2);
}

static inline long arg_long(char **argv, int i, const char *name) {
    char *end;
    long value = strtol(argv[i], &end, 10);
    if (*end || value < 0) {
        fprintf(stderr, "loadgen: %s must be a whole number, got %s\n", name, argv[i]);
        exit(2);
    }
    return value;
}

static inline void raise_nofile(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

/* A non-blocking TCP connection to 127.0.0.1:port; the connect may still be in progress. */
static inline int connect_loopback(int port) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0 && errno != EINPROGRESS)
        die("connect");
    return fd;
}

/* Wait until a connect in progress finishes; 0 when connected. */
static inline int wait_connected(int fd, double timeout) {
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) die("epoll_create1");
    struct epoll_event ev = {.events = EPOLLOUT, .data.fd = fd}, out;
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    int n = epoll_wait(ep, &out, 1, (int)(timeout * 1000));
    close(ep);
    if (n != 1) return -1;
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
    return err ? -1 : 0;
}

/*
 * Open `count` connections, 32 at a time. With `greeted`, the server speaks first (a chat
 * welcome): before the next batch, wait until it has said something on each, i.e. accepted
 * it, so a busy server's listen backlog (50 by default) never overflows into SYN retries
 * a second apart. What arrives meanwhile is read and discarded.
 */
static inline int *connect_many_greeted(int port, int count, int greeted, double timeout) {
    int *fds = calloc((size_t)count, sizeof(int));
    char *heard = calloc((size_t)count, 1);
    static char scratch[65536];
    if (!fds || !heard) die("calloc");
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) die("epoll_create1");
    for (int first = 0; first < count; first += 32) {
        int last = first + 32 < count ? first + 32 : count, waiting = 0;
        for (int i = first; i < last; i++) {
            fds[i] = connect_loopback(port);
            if (wait_connected(fds[i], timeout) < 0) {
                fprintf(stderr, "loadgen: connection %d of %d to port %d failed\n", i + 1, count,
                        port);
                exit(3);
            }
            struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
            epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &ev);
            waiting++;
        }
        if (!greeted) {
            usleep(1000);
            waiting = 0;
        }
        double deadline = now_s() + timeout;
        struct epoll_event events[64];
        while (waiting > 0 || !greeted) {
            int n = epoll_wait(ep, events, 64, greeted ? 10 : 0);
            if (n <= 0 && (!greeted || now_s() > deadline)) break;
            for (int e = 0; e < n; e++) {
                int i = (int)events[e].data.u32;
                ssize_t got = recv(fds[i], scratch, sizeof scratch, 0);
                if (got == 0) {
                    fprintf(stderr, "loadgen: connection %d closed by the server\n", i + 1);
                    exit(3);
                }
                if (got > 0 && !heard[i]) {
                    heard[i] = 1;
                    waiting--;
                }
            }
        }
        if (waiting > 0) {
            fprintf(stderr, "loadgen: the server did not greet %d connections\n", waiting);
            exit(3);
        }
    }
    close(ep);
    free(heard);
    return fds;
}

/* A partial line kept between reads; a line longer than CARRY (a welcome, history) is skipped. */
#define CARRY 512
typedef struct {
    int len, skipping;
    char data[CARRY];
} carry_t;

/* Split what arrived into whole lines for `line` (memchr: this loop is a client's hot path). */
static inline void split_lines(carry_t *carry, const char *data, long len,
                               void (*line)(void *ctx, const char *text, long len), void *ctx) {
    const char *start = data, *end = data + len, *newline;
    while ((newline = memchr(start, '\n', (size_t)(end - start))) != NULL) {
        long piece = newline - start;
        if (carry->skipping) {
            carry->skipping = 0;
        } else if (carry->len) {
            if (carry->len + piece <= CARRY) {
                memcpy(carry->data + carry->len, start, (size_t)piece);
                line(ctx, carry->data, carry->len + piece);
            }
        } else {
            line(ctx, start, piece);
        }
        carry->len = 0;
        start = newline + 1;
    }
    long rest = end - start;
    if (rest > 0 && !carry->skipping) {
        if (carry->len + rest <= CARRY) {
            memcpy(carry->data + carry->len, start, (size_t)rest);
            carry->len += (int)rest;
        } else {
            carry->len = 0;
            carry->skipping = 1;
        }
    }
}

static inline int *connect_many(int port, int count, double timeout) {
    return connect_many_greeted(port, count, 0, timeout);
}

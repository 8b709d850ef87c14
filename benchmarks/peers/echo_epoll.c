/*
 * The physical limit of echo on one core: a single-threaded epoll loop in C.
 * Reads what arrives and writes it straight back; when the socket will not take it all,
 * stops reading that connection until the rest is written (backpressure, bounded memory).
 *
 * usage: echo_epoll PORT   (0 picks a free port; the chosen one is printed)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUFSIZE 65536

typedef struct {
    int fd;
    size_t pending, offset;
    int out; /* registered for EPOLLOUT rather than EPOLLIN */
    char buf[BUFSIZE];
} conn_t;

static void die(const char *what) {
    fprintf(stderr, "echo_epoll: %s: %s\n", what, strerror(errno));
    exit(2);
}

static void drop(conn_t *c) {
    close(c->fd);
    free(c);
}

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 0;
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    int listener = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (listener < 0) die("socket");
    int one = 1;
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(listener, (struct sockaddr *)&addr, sizeof addr) < 0) die("bind");
    if (listen(listener, 4096) < 0) die("listen");
    socklen_t len = sizeof addr;
    getsockname(listener, (struct sockaddr *)&addr, &len);
    printf("epoll-echo listening on 127.0.0.1:%d\n", ntohs(addr.sin_port));
    fflush(stdout);

    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) die("epoll_create1");
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL}, events[256];
    epoll_ctl(ep, EPOLL_CTL_ADD, listener, &ev);
    for (;;) {
        int n = epoll_wait(ep, events, 256, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            conn_t *c = events[i].data.ptr;
            if (c == NULL) {
                int fd;
                while ((fd = accept4(listener, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) >= 0) {
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    conn_t *fresh = malloc(sizeof(conn_t));
                    if (!fresh) { close(fd); continue; }
                    fresh->fd = fd;
                    fresh->pending = fresh->offset = 0;
                    fresh->out = 0;
                    struct epoll_event add = {.events = EPOLLIN, .data.ptr = fresh};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &add);
                }
                continue;
            }
            if (c->pending == 0) {
                ssize_t got = recv(c->fd, c->buf, BUFSIZE, 0);
                if (got == 0 || (got < 0 && errno != EAGAIN)) { drop(c); continue; }
                if (got < 0) continue;
                c->pending = (size_t)got;
                c->offset = 0;
            }
            while (c->pending) {
                ssize_t put = send(c->fd, c->buf + c->offset, c->pending, MSG_NOSIGNAL);
                if (put < 0) {
                    if (errno == EAGAIN) break;
                    c->pending = 0;
                    drop(c);
                    c = NULL;
                    break;
                }
                c->offset += (size_t)put;
                c->pending -= (size_t)put;
            }
            if (c == NULL || c->out == (c->pending != 0)) continue;
            c->out = c->pending != 0;
            struct epoll_event mod = {.events = c->pending ? EPOLLOUT : EPOLLIN, .data.ptr = c};
            epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &mod);
        }
    }
}

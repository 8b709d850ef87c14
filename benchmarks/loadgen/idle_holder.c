/*
 * Holds COUNT idle connections open: connects them a few at a time, prints
 * "connected COUNT", then only reads (and discards) what the server sends, until its
 * stdin closes or HOLD_MS milliseconds pass. Then it closes everything and exits.
 *
 * GREETED 1: the server speaks first; connect at the pace it greets (see connect_many_greeted).
 * usage: idle_holder PORT COUNT HOLD_MS GREETED
 */
#include "common.h"

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: idle_holder PORT COUNT HOLD_MS GREETED\n");
        return 2;
    }
    int port = (int)arg_long(argv, 1, "PORT");
    int count = (int)arg_long(argv, 2, "COUNT");
    double hold = (double)arg_long(argv, 3, "HOLD_MS") / 1000.0;
    raise_nofile();
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) die("epoll_create1");
    int *fds = connect_many_greeted(port, count, (int)arg_long(argv, 4, "GREETED"), 30.0);
    for (int i = 0; i < count; i++) {
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = fds[i]};
        epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &ev);
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = STDIN_FILENO};
    epoll_ctl(ep, EPOLL_CTL_ADD, STDIN_FILENO, &ev);
    printf("connected %d\n", count);
    fflush(stdout);

    static char scratch[65536];
    struct epoll_event events[256];
    long closed_by_server = 0;
    double deadline = now_s() + hold;
    for (;;) {
        double now = now_s();
        if (now >= deadline) break;
        int n = epoll_wait(ep, events, 256, (int)((deadline - now) * 1000) + 1);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int e = 0; e < n; e++) {
            int fd = events[e].data.fd;
            ssize_t got = read(fd, scratch, sizeof scratch);
            if (fd == STDIN_FILENO) {
                if (got <= 0) goto done;
                continue;
            }
            if (got == 0 || (got < 0 && errno != EAGAIN)) {
                closed_by_server++;
                epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
                close(fd);
            }
        }
    }
done:
    fprintf(stderr, "idle_holder: %ld of %d connections closed by the server\n", closed_by_server,
            count);
    return 0;
}

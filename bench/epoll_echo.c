#define _GNU_SOURCE
/* The C baseline: a single-threaded, edge-free epoll echo server.
 * Compiled by `make bench` with the machine's cc; it bounds what any server on
 * this machine can do, and so what the bench client can measure.
 *   epoll_echo PORT --ready-file PATH
 * (0 picks a free port; once listening it writes the launcher's ready file, see
 * harness/launcher.py). It listens on 127.0.0.1, or on ECHO_PEER_HOST (an IPv4
 * address: 0.0.0.0 in its container, `make flood-peers-containers`). */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_EVENTS 256
#define BUF_SIZE 65536

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 0;
    int listener = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    const char *host = getenv("ECHO_PEER_HOST");
    if (host && inet_pton(AF_INET, host, &addr.sin_addr) != 1) {
        fprintf(stderr, "ECHO_PEER_HOST: not an IPv4 address: %s\n", host);
        return 2;
    }
    if (bind(listener, (struct sockaddr *)&addr, sizeof addr) || listen(listener, 1024)) {
        perror("listen");
        return 1;
    }
    socklen_t len = sizeof addr;
    getsockname(listener, (struct sockaddr *)&addr, &len);
    if (argc > 3 && strcmp(argv[2], "--ready-file") == 0) {
        char partial[4096];
        snprintf(partial, sizeof partial, "%s.partial", argv[3]);
        FILE *ready = fopen(partial, "w");
        if (!ready) {
            perror("ready file");
            return 1;
        }
        fprintf(ready, "{\"pid\": %d, \"echo\": [\"127.0.0.1\", %d], \"metrics\": null}\n",
                (int)getpid(), ntohs(addr.sin_port));
        fclose(ready);
        rename(partial, argv[3]); /* atomic: the launcher never reads half of it */
    }

    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = listener}, events[MAX_EVENTS];
    epoll_ctl(ep, EPOLL_CTL_ADD, listener, &ev);
    static char buf[BUF_SIZE];
    for (;;) {
        int n = epoll_wait(ep, events, MAX_EVENTS, -1);
        for (int i = 0; i < n; i++) {
            int fd = events[i].data.fd;
            if (fd == listener) {
                int conn;
                while ((conn = accept4(listener, NULL, NULL, 0)) >= 0) {
                    setsockopt(conn, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    struct epoll_event cev = {.events = EPOLLIN, .data.fd = conn};
                    epoll_ctl(ep, EPOLL_CTL_ADD, conn, &cev);
                }
                continue;
            }
            ssize_t got = recv(fd, buf, sizeof buf, 0);
            if (got <= 0) {
                close(fd);
                continue;
            }
            /* Blocking sends: a ping-pong client always reads, so they never stall. */
            for (ssize_t sent = 0; sent < got;) {
                ssize_t w = send(fd, buf + sent, got - sent, MSG_NOSIGNAL);
                if (w < 0) {
                    if (errno == EINTR) continue;
                    close(fd);
                    break;
                }
                sent += w;
            }
        }
    }
}

#define _GNU_SOURCE
/* The bench client in C: N persistent connections playing ping-pong, one epoll loop.
 * Compiled by `make bench` with the machine's cc, so that the client costs far
 * less per round trip than any server it measures (a Python client on uvloop
 * capped the C server here). Every echoed byte is checked.
 *   pingpong HOST PORT CONNECTIONS SIZE SECONDS OUT
 * Writes (latency, completion time) pairs as native doubles, in seconds, to OUT;
 * prints "completions errors cpu-seconds" on stdout (the CPU it used itself, so that
 * the bench can tell whether the client was the limit). Exit 2 on bad arguments. */
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
#include <time.h>
#include <unistd.h>

struct conn {
    int fd;
    size_t sent, got;
    double started;
};

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int watch(int ep, int op, struct conn *c, int want_out) {
    struct epoll_event ev = {.events = EPOLLIN | (want_out ? EPOLLOUT : 0), .data.ptr = c};
    return epoll_ctl(ep, op, c->fd, &ev);
}

/* Sends what the kernel takes now; asks for EPOLLOUT while part of the message waits. */
static int push(int ep, struct conn *c, const char *payload, size_t size) {
    while (c->sent < size) {
        ssize_t w = send(c->fd, payload + c->sent, size - c->sent, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) return watch(ep, EPOLL_CTL_MOD, c, 1);
            return -1;
        }
        c->sent += w;
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: pingpong HOST PORT CONNECTIONS SIZE SECONDS OUT\n");
        return 2;
    }
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    int connections = atoi(argv[3]);
    size_t size = strtoul(argv[4], NULL, 10);
    double seconds = atof(argv[5]);
    if (inet_pton(AF_INET, argv[1], &addr.sin_addr) != 1 || connections < 1 || size < 1 ||
        seconds <= 0) {
        fprintf(stderr, "pingpong: bad arguments\n");
        return 2;
    }
    FILE *out = fopen(argv[6], "wb");
    char *payload = malloc(size), *scratch = malloc(size);
    struct conn *conns = calloc(connections, sizeof *conns);
    if (!out || !payload || !scratch || !conns) {
        perror("pingpong");
        return 1;
    }
    for (size_t i = 0; i < size; i++) payload[i] = (char)(i % 256);

    int ep = epoll_create1(0), one = 1, open = 0;
    long completions = 0, errors = 0;
    double deadline = now() + seconds;
    for (int i = 0; i < connections; i++) {
        struct conn *c = &conns[i];
        c->fd = socket(AF_INET, SOCK_STREAM, 0);
        if (c->fd < 0 || connect(c->fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
            errors++;
            if (c->fd >= 0) close(c->fd);
            c->fd = -1;
            continue;
        }
        setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        watch(ep, EPOLL_CTL_ADD, c, 0);
        c->started = now();
        if (push(ep, c, payload, size) < 0) {
            errors++;
            close(c->fd);
            continue;
        }
        open++;
    }
    /* A server that stops answering must not hang the bench: give up well after the deadline. */
    double give_up = deadline + 30;
    struct epoll_event events[256];
    while (open > 0 && now() < give_up) {
        int n = epoll_wait(ep, events, 256, 1000);
        for (int i = 0; i < n; i++) {
            struct conn *c = events[i].data.ptr;
            int failed = 0;
            if (events[i].events & EPOLLOUT) {
                failed = push(ep, c, payload, size) < 0;
                if (!failed && c->sent == size) failed = watch(ep, EPOLL_CTL_MOD, c, 0) < 0;
            }
            if (!failed && (events[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP))) {
                ssize_t r = recv(c->fd, scratch, size - c->got, MSG_DONTWAIT);
                if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
                /* The echo must match what was sent, byte for byte, and never run ahead of it. */
                failed = r <= 0 || c->got + r > c->sent || memcmp(scratch, payload + c->got, r);
                if (!failed && (c->got += r) == size) {
                    double t = now();
                    double record[2] = {t - c->started, t};
                    fwrite(record, sizeof record, 1, out);
                    completions++;
                    if (t >= deadline) {
                        close(c->fd);
                        open--;
                        continue;
                    }
                    c->sent = c->got = 0;
                    c->started = t;
                    failed = push(ep, c, payload, size) < 0;
                }
            }
            if (failed) {
                errors++;
                close(c->fd);
                open--;
            }
        }
    }
    errors += open; /* still waiting for an echo when we gave up */
    fclose(out);
    struct rusage usage;
    getrusage(RUSAGE_SELF, &usage);
    double cpu = usage.ru_utime.tv_sec + usage.ru_utime.tv_usec / 1e6 + usage.ru_stime.tv_sec +
                 usage.ru_stime.tv_usec / 1e6;
    printf("%ld %ld %.6f\n", completions, errors, cpu);
    return 0;
}

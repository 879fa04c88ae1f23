// The measuring half of bench/egress.bench.ts (compiled by it with gcc -O2). Loopback only.
//   egress-bench PROCS connect-udp PORT N   socket()+connect()+close() of a UDP socket to 127.0.0.1:PORT,
//                                           N times; prints ns per iteration and how many were refused
//   egress-bench PROCS connect-tcp PORT N   the same with TCP against a listener of our own (forked and
//                                           listening BEFORE we join PROCS, so it stays outside the cgroup)
//   egress-bench PROCS stream PORT MIB      sends MIB MiB over one TCP connection to such a listener;
//                                           prints MiB/s
// PROCS: a cgroup.procs file to join after the listener is up and before our own sockets exist, or "-".
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e9 + ts.tv_nsec;
}

static pid_t sink(int port) {
  int l = socket(AF_INET, SOCK_STREAM, 0);
  int one = 1;
  setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port), .sin_addr = {htonl(INADDR_LOOPBACK)}};
  if (l < 0 || bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 4096)) {
    perror("listener");
    exit(3);
  }
  pid_t p = fork();
  if (p == 0) {
    static char buf[1 << 16];
    for (;;) {
      int c = accept(l, NULL, NULL);
      if (c < 0) continue;
      while (read(c, buf, sizeof buf) > 0) {
      }
      close(c);
    }
  }
  close(l);
  return p;
}

int main(int argc, char **argv) {
  if (argc != 5) return fprintf(stderr, "usage: egress-bench PROCS MODE PORT N\n"), 2;
  const char *mode = argv[2];
  int port = atoi(argv[3]);
  long n = atol(argv[4]);
  pid_t lp = strcmp(mode, "connect-udp") ? sink(port) : 0;
  if (strcmp(argv[1], "-")) {
    int fd = open(argv[1], O_WRONLY);
    if (fd < 0 || write(fd, "0", 1) != 1) return perror("join"), 3;
    close(fd);
  }
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port), .sin_addr = {htonl(INADDR_LOOPBACK)}};
  long refused = 0;
  if (!strcmp(mode, "stream")) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(s, (struct sockaddr *)&a, sizeof a)) return printf("{\"error\":\"%s\"}\n", strerrorname_np(errno)), kill(lp, SIGKILL), 0;
    static char buf[1 << 16];
    memset(buf, 'x', sizeof buf);
    double t0 = now_ns();
    long total = n << 20;
    for (long sent = 0; sent < total;) {
      ssize_t w = write(s, buf, sizeof buf);
      if (w <= 0) return perror("write"), kill(lp, SIGKILL), 4;
      sent += w;
    }
    shutdown(s, SHUT_WR);
    char c;
    (void)!read(s, &c, 1); /* the sink closes after reading everything */
    double secs = (now_ns() - t0) / 1e9;
    printf("{\"mibPerSec\":%.1f}\n", (double)n / secs);
    close(s);
  } else {
    int type = !strcmp(mode, "connect-tcp") ? SOCK_STREAM : SOCK_DGRAM;
    double t0 = now_ns();
    for (long i = 0; i < n; i++) {
      int s = socket(AF_INET, type, 0);
      if (connect(s, (struct sockaddr *)&a, sizeof a)) refused++;
      /* close with RST: no TIME_WAIT, so thousands of connects do not use up the ephemeral ports */
      struct linger lg = {1, 0};
      setsockopt(s, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
      close(s);
    }
    double per = (now_ns() - t0) / (double)n;
    printf("{\"nsPerConnect\":%.1f,\"refused\":%ld,\"firstError\":\"%s\"}\n", per, refused, refused ? "EPERM?" : "none");
  }
  if (lp > 0) {
    kill(lp, SIGKILL);
    waitpid(lp, NULL, 0);
  }
  return 0;
}

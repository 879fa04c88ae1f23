// One network attempt, for test/egress/filter.test.ts (compiled by the test with gcc):
//   attempt PROCS MODE ADDR PORT TOKEN
// PROCS is a cgroup.procs file the process writes itself into FIRST, before any socket exists (or "-"
// to stay where it is: the positive control). MODE: tcp, udp-sendto, udp-connect, sendmmsg, tfo, icmp,
// dns, thread, daemon; and ptrace / vmread (PORT = target pid) for the ptrace detection. Every mode carries TOKEN so the listener can tell which attempt reached it. Prints
// one JSON line: {"result":"ok"|"<errno name>","pid":N[,"answer":...]}.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/ip_icmp.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

static const char *addr_s, *token;
static int port;
static struct sockaddr_storage dst;
static socklen_t dst_len;
static int family;

static const char *ename(int e) { return e ? strerrorname_np(e) : "ok"; }

static void parse_dst(void) {
  memset(&dst, 0, sizeof dst);
  struct sockaddr_in *a4 = (struct sockaddr_in *)&dst;
  struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)&dst;
  if (inet_pton(AF_INET, addr_s, &a4->sin_addr) == 1) {
    a4->sin_family = family = AF_INET;
    a4->sin_port = htons((unsigned short)port);
    dst_len = sizeof *a4;
  } else if (inet_pton(AF_INET6, addr_s, &a6->sin6_addr) == 1) {
    a6->sin6_family = family = AF_INET6;
    a6->sin6_port = htons((unsigned short)port);
    dst_len = sizeof *a6;
  } else {
    fprintf(stderr, "bad address\n");
    exit(2);
  }
}

static int tcp_attempt(void) {
  int s = socket(family, SOCK_STREAM, 0);
  if (s < 0) return errno;
  if (connect(s, (struct sockaddr *)&dst, dst_len)) return errno;
  int r = send(s, token, strlen(token), 0) < 0 ? errno : 0;
  close(s);
  return r;
}

static void *thread_main(void *arg) {
  *(int *)arg = tcp_attempt();
  return NULL;
}

/* A minimal DNS query for "<token>.test" A, over a connected UDP socket as resolvers do. */
static int dns_attempt(char *answer, size_t cap) {
  unsigned char q[300];
  size_t n = 0;
  q[n++] = 0x12, q[n++] = 0x34, q[n++] = 0x01, q[n++] = 0x00; /* id, RD */
  q[n++] = 0, q[n++] = 1, q[n++] = 0, q[n++] = 0, q[n++] = 0, q[n++] = 0, q[n++] = 0, q[n++] = 0;
  size_t tl = strlen(token);
  if (tl > 60) return EINVAL;
  q[n++] = (unsigned char)tl;
  memcpy(q + n, token, tl), n += tl;
  q[n++] = 4;
  memcpy(q + n, "test", 4), n += 4;
  q[n++] = 0;
  q[n++] = 0, q[n++] = 1, q[n++] = 0, q[n++] = 1; /* A, IN */
  int s = socket(family, SOCK_DGRAM, 0);
  if (s < 0) return errno;
  if (connect(s, (struct sockaddr *)&dst, dst_len)) return errno;
  if (send(s, q, n, 0) < 0) return errno;
  struct pollfd p = {s, POLLIN, 0};
  if (poll(&p, 1, 2000) != 1) return ETIMEDOUT;
  unsigned char r[512];
  ssize_t got = recv(s, r, sizeof r, 0);
  if (got < 0) return errno;
  /* the answer's last 4 bytes are the A record's address */
  if (got >= 4) snprintf(answer, cap, "%u.%u.%u.%u", r[got - 4], r[got - 3], r[got - 2], r[got - 1]);
  return 0;
}

static unsigned short csum(const void *data, size_t len) {
  const unsigned short *p = data;
  unsigned long sum = 0;
  for (; len > 1; len -= 2) sum += *p++;
  if (len) sum += *(const unsigned char *)p;
  while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
  return (unsigned short)~sum;
}

int main(int argc, char **argv) {
  if (argc != 6) return fprintf(stderr, "usage: attempt PROCS MODE ADDR PORT TOKEN\n"), 2;
  if (strcmp(argv[1], "-")) {
    int fd = open(argv[1], O_WRONLY);
    if (fd < 0 || write(fd, "0", 1) != 1) return perror("join cgroup"), 3;
    close(fd);
  }
  const char *mode = argv[2];
  if (!strcmp(mode, "ptrace") || !strcmp(mode, "vmread")) {
    /* ADDR unused; PORT is the target pid (test/egress/filter.test.ts: the ptrace detection) */
    pid_t target = (pid_t)atoi(argv[4]);
    int r = 0;
    if (!strcmp(mode, "ptrace")) {
      if (ptrace(PTRACE_ATTACH, target, NULL, NULL)) r = errno;
      else waitpid(target, NULL, 0), ptrace(PTRACE_DETACH, target, NULL, NULL);
    } else {
      char b;
      struct iovec local = {&b, 1}, remote = {(void *)0x1000, 1};
      if (process_vm_readv(target, &local, 1, &remote, 1, 0) < 0) r = errno;
    }
    printf("{\"result\":\"%s\",\"pid\":%d}\n", ename(r), (int)getpid());
    return 0;
  }
  addr_s = argv[3];
  port = atoi(argv[4]);
  token = argv[5];
  parse_dst();
  int r = EINVAL;
  char answer[64] = "";
  if (!strcmp(mode, "tcp")) {
    r = tcp_attempt();
  } else if (!strcmp(mode, "udp-sendto")) {
    int s = socket(family, SOCK_DGRAM, 0);
    r = s < 0 ? errno : sendto(s, token, strlen(token), 0, (struct sockaddr *)&dst, dst_len) < 0 ? errno : 0;
  } else if (!strcmp(mode, "udp-connect")) {
    int s = socket(family, SOCK_DGRAM, 0);
    r = s < 0 ? errno : connect(s, (struct sockaddr *)&dst, dst_len) ? errno : send(s, token, strlen(token), 0) < 0 ? errno : 0;
  } else if (!strcmp(mode, "sendmmsg")) {
    int s = socket(family, SOCK_DGRAM, 0);
    struct iovec iov[2] = {{(void *)token, strlen(token)}, {(void *)token, strlen(token)}};
    struct mmsghdr m[2];
    memset(m, 0, sizeof m);
    for (int i = 0; i < 2; i++) {
      m[i].msg_hdr.msg_name = &dst;
      m[i].msg_hdr.msg_namelen = dst_len;
      m[i].msg_hdr.msg_iov = &iov[i];
      m[i].msg_hdr.msg_iovlen = 1;
    }
    int sent = s < 0 ? -1 : sendmmsg(s, m, 2, 0);
    r = sent < 0 ? errno : sent == 2 ? 0 : EIO;
  } else if (!strcmp(mode, "tfo")) {
    int s = socket(family, SOCK_STREAM, 0);
    r = s < 0 ? errno : sendto(s, token, strlen(token), MSG_FASTOPEN, (struct sockaddr *)&dst, dst_len) < 0 ? errno : 0;
    if (s >= 0 && !r) usleep(100000), close(s);
  } else if (!strcmp(mode, "icmp")) {
    /* A raw ICMP echo request carrying the token (IPv4; the raw socket bypasses the socket hooks). */
    int s = socket(AF_INET, SOCK_RAW, IPPROTO_ICMP);
    unsigned char pkt[128];
    memset(pkt, 0, sizeof pkt);
    struct icmphdr *h = (struct icmphdr *)pkt;
    h->type = ICMP_ECHO;
    h->un.echo.id = htons((unsigned short)getpid());
    h->un.echo.sequence = htons(1);
    size_t tl = strlen(token);
    memcpy(pkt + sizeof *h, token, tl);
    h->checksum = csum(pkt, sizeof *h + tl);
    r = s < 0 ? errno : sendto(s, pkt, sizeof *h + tl, 0, (struct sockaddr *)&dst, dst_len) < 0 ? errno : 0;
  } else if (!strcmp(mode, "dns")) {
    r = dns_attempt(answer, sizeof answer);
  } else if (!strcmp(mode, "thread")) {
    pthread_t th;
    if (pthread_create(&th, NULL, thread_main, &r) || pthread_join(th, NULL)) r = EAGAIN;
  } else if (!strcmp(mode, "daemon")) {
    /* Double fork: the grandchild is a daemon in its own session, reparented away from us. */
    int p[2];
    if (pipe(p)) return 4;
    pid_t c = fork();
    if (c == 0) {
      if (setsid() < 0) _exit(5);
      if (fork() == 0) {
        close(p[0]);
        int e = tcp_attempt();
        int out[2] = {e, getpid()};
        (void)!write(p[1], out, sizeof out);
        _exit(0);
      }
      _exit(0);
    }
    close(p[1]);
    waitpid(c, NULL, 0);
    int in[2] = {EIO, 0};
    struct pollfd pf = {p[0], POLLIN, 0};
    if (poll(&pf, 1, 5000) == 1 && read(p[0], in, sizeof in) == sizeof in) r = in[0];
    printf("{\"result\":\"%s\",\"pid\":%d,\"daemonPid\":%d}\n", ename(r), (int)getpid(), in[1]);
    return 0;
  } else {
    return fprintf(stderr, "unknown mode\n"), 2;
  }
  printf("{\"result\":\"%s\",\"pid\":%d,\"answer\":\"%s\"}\n", ename(r), (int)getpid(), answer);
  return 0;
}

/* clock_shift.c: an LD_PRELOAD shim that moves a process's wall clock by
 * the number of seconds written in the file named by $CLOCK_SHIFT_FILE,
 * re-read on every call, so a test can step a running redis-server's clock
 * (what an operator's `date -s` or a bad NTP step does to its host).
 *
 * libfaketime does the same job but cannot start Debian's redis-server
 * (jemalloc calls clock_gettime while libfaketime initialises). So this
 * shim allocates nothing and calls the kernel directly: open/read/close and
 * the clock_gettime system call.
 *
 * Only CLOCK_REALTIME moves; monotonic clocks are left alone, as a real
 * step leaves them. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static long shift_seconds(void) {
    const char *path = getenv("CLOCK_SHIFT_FILE");
    if (!path) return 0;
    int fd = open(path, O_RDONLY);
    if (fd < 0) return 0;
    char buf[32];
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return 0;
    buf[n] = 0;
    return strtol(buf, NULL, 10);
}

int clock_gettime(clockid_t id, struct timespec *ts) {
    int r = (int)syscall(SYS_clock_gettime, id, ts);
    if (r == 0 && (id == CLOCK_REALTIME || id == CLOCK_REALTIME_COARSE)) {
        ts->tv_sec += shift_seconds();
    }
    return r;
}

int gettimeofday(struct timeval *tv, void *tz) {
    (void)tz;
    struct timespec ts;
    int r = clock_gettime(CLOCK_REALTIME, &ts);
    if (r == 0 && tv) {
        tv->tv_sec = ts.tv_sec;
        tv->tv_usec = ts.tv_nsec / 1000;
    }
    return r;
}

time_t time(time_t *out) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (out) *out = ts.tv_sec;
    return ts.tv_sec;
}

/* The lab's wall-clock jump (`hakit lab clockjump NODE SECONDS`): an LD_PRELOAD library that
 * adds an offset to CLOCK_REALTIME as the processes of one lab node read it, like an NTP step
 * or an operator's `date -s` on that node alone, without touching the shared machine's clock.
 *
 * The offset (seconds, a decimal number) is read from the file named by HAKIT_CLOCK_SHIFT_FILE,
 * at most every 50 ms (measured on CLOCK_MONOTONIC); a missing or unreadable file means 0.
 * Only the wall clock moves: clock_gettime(CLOCK_REALTIME*), gettimeofday() and time(). The
 * monotonic and boot-time clocks, on which every hakit deadline runs, never jump on Linux;
 * they are left alone. Built by the lab at `lab up` (cc -shared); lab only, never installed.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/time.h>
#include <time.h>

static int (*real_clock_gettime)(clockid_t, struct timespec *);
static double cached_offset;
static double next_read; /* monotonic seconds */

static double now_monotonic(void) {
    struct timespec ts;
    real_clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double offset(void) {
    double now = now_monotonic();
    if (now < next_read)
        return cached_offset;
    next_read = now + 0.05;
    const char *path = getenv("HAKIT_CLOCK_SHIFT_FILE");
    double value = 0.0;
    FILE *f = path ? fopen(path, "re") : NULL;
    if (f) {
        if (fscanf(f, "%lf", &value) != 1)
            value = 0.0;
        fclose(f);
    }
    cached_offset = value;
    return value;
}

static void shift(struct timespec *ts) {
    double off = offset();
    long long ns = (long long)ts->tv_nsec + (long long)((off - (long long)off) * 1e9);
    ts->tv_sec += (time_t)(long long)off + (time_t)(ns / 1000000000LL);
    ns %= 1000000000LL;
    if (ns < 0) {
        ns += 1000000000LL;
        ts->tv_sec -= 1;
    }
    ts->tv_nsec = (long)ns;
}

__attribute__((constructor)) static void init(void) {
    real_clock_gettime = dlsym(RTLD_NEXT, "clock_gettime");
}

int clock_gettime(clockid_t id, struct timespec *ts) {
    if (!real_clock_gettime)
        init();
    int r = real_clock_gettime(id, ts);
    if (r == 0 && (id == CLOCK_REALTIME || id == CLOCK_REALTIME_COARSE))
        shift(ts);
    return r;
}

int gettimeofday(struct timeval *restrict tv, void *restrict tz) {
    struct timespec ts;
    (void)tz;
    if (clock_gettime(CLOCK_REALTIME, &ts) != 0)
        return -1;
    tv->tv_sec = ts.tv_sec;
    tv->tv_usec = ts.tv_nsec / 1000;
    return 0;
}

time_t time(time_t *out) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (out)
        *out = ts.tv_sec;
    return ts.tv_sec;
}

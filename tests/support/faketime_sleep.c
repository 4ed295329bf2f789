/*
 * Loaded before Debian's libfaketime when the unit tests run under a clock moved
 * ahead (make test). With FAKETIME_DONT_FAKE_MONOTONIC=1, libfaketime 0.9.10 still
 * shifts the absolute deadline of clock_nanosleep() on the monotonic clock by the
 * fake offset, so every time.sleep() in Python fails with EINVAL; without that
 * setting, a fake monotonic clock makes every timed lock wait (sem_clockwait) hang.
 * This passes sleeps on clocks other than CLOCK_REALTIME straight to the kernel, so
 * only the wall clock is moved, as intended.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

int clock_nanosleep(clockid_t clock, int flags, const struct timespec *request,
                    struct timespec *remain)
{
    static int (*next)(clockid_t, int, const struct timespec *, struct timespec *);

    if (clock != CLOCK_REALTIME)
        return syscall(SYS_clock_nanosleep, clock, flags, request, remain) == 0 ? 0 : errno;
    if (next == NULL)
        next = (int (*)(clockid_t, int, const struct timespec *, struct timespec *))
            dlsym(RTLD_NEXT, "clock_nanosleep");
    return next(clock, flags, request, remain);
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import Foundation

/// Runs one short-lived helper (an exec credential plugin) so that nothing it does can hold us past a
/// deadline or past a memory cap. This file is the KubernetesAPI module's only seam to posix_spawn and its
/// pointers.
///
/// - The child starts with an empty signal mask and default dispositions. We are often started by
///   something that blocks or ignores signals, and libdispatch's threads block nearly all of them; a child
///   that inherits that cannot be stopped with SIGTERM.
/// - The child leads its own process group, and at the deadline the whole group gets SIGTERM, then
///   SIGKILL a second later, so a wrapper script's background helpers go too.
/// - Reading stops at the deadline whatever the pipes do: a grandchild that keeps stdout open cannot
///   make us wait for an end-of-file that never comes. After the child exits, the pipes get a short grace
///   to deliver what it wrote, then are closed.
/// - stdout is capped; stderr keeps its last `stderrKept` bytes.
enum PluginProcess {
    struct Outcome: Sendable {
        /// The exit status, or 128 + signal number when it was killed.
        var exitStatus: Int32
        var stdout: [UInt8]
        var stderr: [UInt8]
        var timedOut: Bool
        /// stdout passed `stdoutLimit`; the group was stopped.
        var stdoutOverflow: Bool
    }

    struct SpawnError: Error, CustomStringConvertible {
        var description: String
    }

    static let stderrKept = 64 << 10
    /// How long the pipes may stay open after the child exited.
    static let drainGrace: Duration = .milliseconds(500)
    /// Between SIGTERM and SIGKILL.
    static let killGrace: Duration = .seconds(1)

    /// Blocks the calling thread until the child exited (or was stopped) and the pipes are done with.
    static func run(executable: String, arguments: [String], environment: [String: String],
                    timeout: Duration, stdoutLimit: Int) throws(SpawnError) -> Outcome {
        let clock = ContinuousClock()
        let deadline = clock.now + timeout
        var outPipe: [Int32] = [-1, -1], errPipe: [Int32] = [-1, -1]
        // pipe2 is not imported; close-on-exec right after (only the child's dup2 copies survive exec).
        guard pipe(&outPipe) == 0 else { throw SpawnError(description: "pipe: \(String(cString: strerror(errno)))") }
        guard pipe(&errPipe) == 0 else {
            close(outPipe[0]); close(outPipe[1])
            throw SpawnError(description: "pipe: \(String(cString: strerror(errno)))")
        }
        for fd in outPipe + errPipe { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        var pid: pid_t = 0
        let spawnError = spawn(&pid, executable: executable, arguments: arguments, environment: environment,
                               stdout: outPipe[1], stderr: errPipe[1])
        close(outPipe[1]); close(errPipe[1])
        if spawnError != 0 {
            close(outPipe[0]); close(errPipe[0])
            throw SpawnError(description: String(cString: strerror(spawnError)))
        }
        var out: [UInt8] = [], err: [UInt8] = []
        var openFDs: [Int32] = [outPipe[0], errPipe[0]]
        defer { for fd in openFDs { close(fd) } }
        var status: Int32? = nil
        var exitedAt: ContinuousClock.Instant? = nil
        var timedOut = false, overflow = false
        var buffer = [UInt8](repeating: 0, count: 64 << 10)

        while !openFDs.isEmpty {
            if status == nil, let s = reap(pid, block: false) { status = s; exitedAt = clock.now }
            let now = clock.now
            if now >= deadline { timedOut = status == nil; break }
            if let exitedAt, now >= exitedAt + drainGrace { break }
            var until = deadline
            if let exitedAt { until = min(until, exitedAt + drainGrace) }
            // Wake at least every 50 ms to notice the child's exit while a grandchild holds the pipes.
            let wait = min(milliseconds(until - now), 50)
            var fds = openFDs.map { pollfd(fd: $0, events: Int16(POLLIN), revents: 0) }
            let ready = poll(&fds, nfds_t(fds.count), Int32(max(wait, 1)))
            if ready < 0 {
                if errno == EINTR { continue }
                break
            }
            for p in fds where p.revents != 0 {
                let n = buffer.withUnsafeMutableBytes { read(p.fd, $0.baseAddress!, $0.count) }
                if n > 0 {
                    if p.fd == outPipe[0] {
                        out.append(contentsOf: buffer[0..<n])
                        if out.count > stdoutLimit { overflow = true }
                    } else {
                        err.append(contentsOf: buffer[0..<n])
                        if err.count > 2 * stderrKept { err.removeFirst(err.count - stderrKept) }
                    }
                } else if n == 0 || (errno != EINTR && errno != EAGAIN) {
                    close(p.fd)
                    openFDs.removeAll { $0 == p.fd }
                }
            }
            if overflow { break }
        }
        if status == nil, !timedOut, !overflow {
            // The pipes closed first: the child may still be finishing, until the deadline.
            status = reapUntil(pid, deadline: deadline)
            if status == nil { timedOut = true }
        }
        if status == nil { status = stop(pid) }
        if timedOut || overflow {
            kill(-pid, SIGKILL)  // whatever of the group is left
        }
        if err.count > stderrKept { err.removeFirst(err.count - stderrKept) }
        return Outcome(exitStatus: status ?? -1, stdout: overflow ? [] : out, stderr: err, timedOut: timedOut,
                       stdoutOverflow: overflow)
    }

    /// SIGTERM to the group, SIGKILL a second later; returns the child's status. The child itself is
    /// signalled too, in case it left the group (setsid) and the group signal missed it.
    private static func stop(_ pid: pid_t) -> Int32? {
        kill(-pid, SIGTERM)
        kill(pid, SIGTERM)
        if let s = reapUntil(pid, deadline: ContinuousClock.now + killGrace) { return s }
        kill(-pid, SIGKILL)
        kill(pid, SIGKILL)
        return reap(pid, block: true)
    }

    private static func reapUntil(_ pid: pid_t, deadline: ContinuousClock.Instant) -> Int32? {
        while true {
            if let s = reap(pid, block: false) { return s }
            if ContinuousClock.now >= deadline { return nil }
            usleep(10_000)
        }
    }

    private static func reap(_ pid: pid_t, block: Bool) -> Int32? {
        var raw: Int32 = 0
        while true {
            let r = waitpid(pid, &raw, block ? 0 : WNOHANG)
            if r == pid { break }
            if r < 0 && errno == EINTR { continue }
            return nil
        }
        // WIFEXITED / WEXITSTATUS / WTERMSIG by hand: the macros are not imported.
        if raw & 0x7F == 0 { return (raw >> 8) & 0xFF }
        return 128 + (raw & 0x7F)
    }

    private static func milliseconds(_ d: Duration) -> Int {
        let c = d.components
        return max(0, Int(c.seconds) * 1000 + Int(c.attoseconds / 1_000_000_000_000_000))
    }

    /// posix_spawn with an empty signal mask, default dispositions, its own process group, stdin from
    /// /dev/null. Returns 0 or an errno.
    private static func spawn(_ pid: inout pid_t, executable: String, arguments: [String],
                              environment: [String: String], stdout: Int32, stderr: Int32) -> Int32 {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_adddup2(&actions, stdout, 1)
        posix_spawn_file_actions_adddup2(&actions, stderr, 2)

        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        var empty = sigset_t()
        sigemptyset(&empty)
        posix_spawnattr_setsigmask(&attr, &empty)
        var all = sigset_t()
        sigfillset(&all)
        sigdelset(&all, SIGKILL)
        sigdelset(&all, SIGSTOP)
        posix_spawnattr_setsigdefault(&attr, &all)
        posix_spawnattr_setpgroup(&attr, 0)
        posix_spawnattr_setflags(&attr, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETPGROUP))

        let argv = ([executable] + arguments).map { strdup($0) } + [nil]
        let envp = environment.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer {
            for p in argv { free(p) }
            for p in envp { free(p) }
        }
        return posix_spawn(&pid, executable, &actions, &attr, argv, envp)
    }
}

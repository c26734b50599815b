#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// What a finished child process left behind.
struct ProcessOutput: Sendable {
    var status: Int32
    var stdout: String
    var stderr: String
    /// The command line, for error messages.
    var command: String
    var succeeded: Bool { status == 0 }
}

/// Runs a program with stdin text and collects stdout/stderr, without Foundation. `posix_spawn` plus one
/// `poll` loop, so a child that writes a lot to both pipes while we still feed it stdin never deadlocks.
enum ProcessRunner {
    /// Where iptables and util-linux live on the distributions kube-proxy runs on, searched before `PATH`
    /// because sudo and container images often leave sbin directories out of it.
    static let searchPath = ["/usr/sbin", "/sbin", "/usr/bin", "/bin", "/usr/local/sbin", "/usr/local/bin"]

    /// The absolute path of an executable, or nil when it is not installed.
    static func find(_ name: String) -> String? {
        if name.hasPrefix("/") { return access(name, X_OK) == 0 ? name : nil }
        var dirs = searchPath
        if let p = getenv("PATH") {
            dirs += String(cString: p).split(separator: ":").map(String.init)
        }
        for dir in dirs where !dir.isEmpty {
            let candidate = dir + "/" + name
            if access(candidate, X_OK) == 0 { return candidate }
        }
        return nil
    }

    /// A failed spawn (not a failed exit status): the errno of posix_spawn.
    struct SpawnError: Error { var errno: Int32; var command: String }

    /// `stdinChunks`: more input after `input`, asked for whenever the child has taken everything so far
    /// (nil: the end). The child reads one chunk while the next is made: a restore starts parsing the first
    /// chains while the rest are still being written.
    static func run(_ executable: String, _ arguments: [String], stdin input: String = "",
                    stdinChunks: (() -> [UInt8]?)? = nil) throws(SpawnError) -> ProcessOutput {
        ignoreSIGPIPE
        let command = ([executable] + arguments).joined(separator: " ")
        var inPipe: [Int32] = [-1, -1], outPipe: [Int32] = [-1, -1], errPipe: [Int32] = [-1, -1]
        guard makePipe(&inPipe) else { throw SpawnError(errno: errno, command: command) }
        guard makePipe(&outPipe) else {
            let e = errno; close(inPipe[0]); close(inPipe[1]); throw SpawnError(errno: e, command: command)
        }
        guard makePipe(&errPipe) else {
            let e = errno; [inPipe[0], inPipe[1], outPipe[0], outPipe[1]].forEach { close($0) }
            throw SpawnError(errno: e, command: command)
        }

        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, inPipe[0], 0)
        posix_spawn_file_actions_adddup2(&actions, outPipe[1], 1)
        posix_spawn_file_actions_adddup2(&actions, errPipe[1], 2)

        // The C locale keeps the tools' messages in English, so error classification below works.
        var env: [String] = ["LC_ALL=C", "PATH=/usr/sbin:/sbin:/usr/bin:/bin"]
        if let v = getenv("XTABLES_LOCKFILE") { env.append("XTABLES_LOCKFILE=" + String(cString: v)) }
        let argv = [executable] + arguments
        var pid: pid_t = 0
        let rc = withCStrings(argv) { cArgv in
            withCStrings(env) { cEnv in
                posix_spawn(&pid, executable, &actions, nil, cArgv, cEnv)
            }
        }
        close(inPipe[0]); close(outPipe[1]); close(errPipe[1])
        if rc != 0 {
            close(inPipe[1]); close(outPipe[0]); close(errPipe[0])
            throw SpawnError(errno: rc, command: command)
        }

        var pending = Array(input.utf8)
        var written = 0
        var more = stdinChunks
        var inFD: Int32 = pending.isEmpty && more == nil ? -1 : inPipe[1]
        if inFD < 0 { close(inPipe[1]) } else {
            _ = fcntl(inFD, F_SETFL, fcntl(inFD, F_GETFL) | O_NONBLOCK)
            if more != nil { _ = fcntl(inFD, 1031 /* F_SETPIPE_SZ */, 1 << 20) }  // room for a whole chunk; best effort
        }
        var outFD = outPipe[0], errFD = errPipe[0]
        var out: [UInt8] = [], err: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        while inFD >= 0 || outFD >= 0 || errFD >= 0 {
            var fds = [pollfd(fd: inFD, events: Int16(POLLOUT), revents: 0),
                       pollfd(fd: outFD, events: Int16(POLLIN), revents: 0),
                       pollfd(fd: errFD, events: Int16(POLLIN), revents: 0)]
            let n = poll(&fds, 3, -1)
            if n < 0 { if errno == EINTR { continue } else { break } }
            if inFD >= 0 && fds[0].revents != 0 {
                if written == pending.count, let next = more {
                    if let chunk = next() { pending = chunk; written = 0 } else { more = nil }
                }
                var failed = false
                if written < pending.count {
                    let w = pending.withUnsafeBytes { raw in
                        write(inFD, raw.baseAddress! + written, min(raw.count - written, 1 << 20))
                    }
                    if w > 0 { written += w }
                    failed = w < 0 && errno != EAGAIN && errno != EINTR
                }
                if failed || (written == pending.count && more == nil) {
                    close(inFD); inFD = -1  // done, or the child closed its stdin (EPIPE): it will say why
                }
            }
            for (index, isOut) in [(1, true), (2, false)] {
                let fd = isOut ? outFD : errFD
                guard fd >= 0, fds[index].revents != 0 else { continue }
                let r = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
                if r > 0 {
                    if isOut { out += buffer[0..<r] } else { err += buffer[0..<r] }
                } else if r == 0 || (errno != EINTR && errno != EAGAIN) {
                    close(fd)
                    if isOut { outFD = -1 } else { errFD = -1 }
                }
            }
        }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        // WIFEXITED / WEXITSTATUS are macros; decode by hand. A signal gives 128 + signal like a shell.
        let exit: Int32 = (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
        return ProcessOutput(status: exit, stdout: String(decoding: out, as: UTF8.self),
                             stderr: String(decoding: err, as: UTF8.self), command: command)
    }

    /// pipe() with close-on-exec on both ends (pipe2 is not imported), so no other child inherits them.
    private static func makePipe(_ fds: inout [Int32]) -> Bool {
        guard pipe(&fds) == 0 else { return false }
        _ = fcntl(fds[0], F_SETFD, FD_CLOEXEC)
        _ = fcntl(fds[1], F_SETFD, FD_CLOEXEC)
        return true
    }

    /// A write to a pipe whose reader died must give EPIPE, not kill the CLI.
    private static let ignoreSIGPIPE: Void = { _ = signal(SIGPIPE, SIG_IGN) }()

    private static func withCStrings<R>(_ strings: [String], _ body: ([UnsafeMutablePointer<CChar>?]) -> R) -> R {
        var pointers: [UnsafeMutablePointer<CChar>?] = strings.map { strdup($0) }
        pointers.append(nil)
        defer { pointers.forEach { free($0) } }
        return body(pointers)
    }
}

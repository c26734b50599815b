import Foundation
import NetlinkBackend

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// One owner of our rules per network namespace. `sync` holds this lock for its whole life; a one-shot
/// `apply` or `remove` takes it for the length of its change. A second owner is refused with exit 75
/// (EX_TEMPFAIL) naming the holder's pid: when the holder is a running `sync`, at once (it will not let go);
/// when it is another one-shot command, after waiting up to `wait` for it to finish.
///
/// The lock is `flock(2)` on `/run/hostnet-dnat/netns-<dev>-<inode>.lock`, the namespace's identity (two
/// paths to one namespace, `/run/netns/x` and `/proc/PID/ns/net`, share the lock; two namespaces never do).
/// The holder writes "<role> <pid>" into it; the kernel drops the lock when the process dies, however it dies.
public final class NodeLock: @unchecked Sendable {
    public enum Role: String, Sendable { case sync, apply, remove }

    public static let directory = "/run/hostnet-dnat"
    public static let tempFailCode: Int32 = 75

    private let fd: Int32
    public let path: String

    private init(fd: Int32, path: String) { self.fd = fd; self.path = path }

    deinit { close(fd) }

    /// The lock file for the namespace of `context` (nil: this process's).
    public static func path(for context: NodeContext) throws(NodeError) -> String {
        let nsPath = context.netns?.path ?? "/proc/self/ns/net"
        var st = stat()
        guard stat(nsPath, &st) == 0 else {
            throw NodeError(exitCode: NodeError.usageCode,
                            description: "\(nsPath): cannot identify the network namespace (\(String(cString: strerror(errno))))")
        }
        return "\(directory)/netns-\(st.st_dev)-\(st.st_ino).lock"
    }

    /// Takes the lock for `role`, or throws exit 75 naming who holds it.
    public static func acquire(_ role: Role, context: NodeContext, wait: Duration = .seconds(30)) throws(NodeError) -> NodeLock {
        let path = try path(for: context)
        if mkdir(directory, 0o700) != 0 && errno != EEXIST {
            throw cannotOpen(path, errno)
        }
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0o600)
        guard fd >= 0 else { throw cannotOpen(path, errno) }
        let deadline = ContinuousClock.now + wait
        while true {
            if flock(fd, LOCK_EX | LOCK_NB) == 0 { break }
            let e = errno
            if e == EINTR { continue }
            guard e == EWOULDBLOCK else {
                close(fd)
                throw NodeError(exitCode: NodeError.cantCreateCode, description: "\(path): cannot lock (\(String(cString: strerror(e))))")
            }
            var holder = readHolder(fd)
            // The text is the last holder's until the new one writes its own: a dead pid means a new holder
            // is just starting (it is not known to be a sync yet).
            if let h = holder, kill(h.pid, 0) != 0 && errno == ESRCH { holder = nil }
            let who = holder.map { "`hostnet-dnat \($0.role)` (pid \($0.pid))" } ?? "another hostnet-dnat process"
            if holder?.role == Role.sync.rawValue || ContinuousClock.now >= deadline {
                close(fd)
                let context = context.netns.map { "network namespace \($0.path)" } ?? "this network namespace"
                let advice = holder?.role == Role.sync.rawValue
                    ? "it keeps the rules current and owns them while it runs; stop it first (or let it do the change)"
                    : "it has held the lock for more than \(wait.components.seconds) s; try again when it is done"
                throw NodeError(exitCode: tempFailCode,
                                description: "\(who) owns the rules of \(context) (lock \(path)): \(advice)")
            }
            usleep(50_000)
        }
        // Say who we are, for the next one who finds the lock taken.
        let text = "\(role.rawValue) \(getpid())\n"
        _ = ftruncate(fd, 0)
        _ = text.withCString { pwrite(fd, $0, strlen($0), 0) }
        return NodeLock(fd: fd, path: path)
    }

    private static func readHolder(_ fd: Int32) -> (role: String, pid: Int32)? {
        var buffer = [UInt8](repeating: 0, count: 64)
        let n = buffer.withUnsafeMutableBytes { pread(fd, $0.baseAddress, 63, 0) }
        guard n > 0 else { return nil }
        let parts = String(decoding: buffer[0..<n], as: UTF8.self).split(whereSeparator: \.isWhitespace)
        guard parts.count == 2, let pid = Int32(parts[1]), Role(rawValue: String(parts[0])) != nil else { return nil }
        return (String(parts[0]), pid)
    }

    private static func cannotOpen(_ path: String, _ e: Int32) -> NodeError {
        NodeError(exitCode: NodeError.cantCreateCode, description:
            "cannot open the lock file \(path) (\(String(cString: strerror(e)))); it makes one process at a time own this "
            + "namespace's rules. Make /run writable for this process (in a pod: mount the host's /run/hostnet-dnat)"
            + (e == ELOOP ? ", and remove the symlink at \(path)" : ""))
    }
}

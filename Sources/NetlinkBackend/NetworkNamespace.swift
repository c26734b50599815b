import Foundation

/// A network namespace: a name under /run/netns (as `ip netns` creates them) or any namespace file such as
/// /proc/PID/ns/net. Netlink sockets belong to the namespace of the thread that opened them, so work for
/// another namespace runs on a dedicated thread that has entered it with setns(CLONE_NEWNET); the calling
/// thread (and the rest of the process) never changes namespace.
public struct NetworkNamespace: Sendable, Hashable, CustomStringConvertible {
    /// The namespace file, usable as `nsenter --net=PATH cmd` or `ip netns exec` (for /run/netns names).
    public let path: String

    public init(path: String) { self.path = path }

    /// `ip netns` name: /run/netns/NAME.
    public init(name: String) throws(NetlinkError) {
        guard !name.isEmpty, name != ".", name != "..", !name.contains("/"), !name.contains("\0") else {
            throw NetlinkError(kind: .namespace, operation: nil, errno: 0, message: "invalid network namespace name \"\(name)\"")
        }
        self.path = "/run/netns/\(name)"
    }

    /// The namespace of process `pid`.
    public static func process(_ pid: Int32) -> NetworkNamespace { NetworkNamespace(path: "/proc/\(pid)/ns/net") }

    /// Accepts a name or a path (anything containing "/").
    public static func parse(_ text: String) throws(NetlinkError) -> NetworkNamespace {
        text.contains("/") ? NetworkNamespace(path: text) : try NetworkNamespace(name: text)
    }

    public var description: String { path }

    /// Runs `body` on a fresh thread that has entered this namespace, and waits for it. Errors from entering
    /// the namespace are `NetlinkError`s of kind `.namespace` or `.permissionDenied`; `body`'s own errors
    /// are rethrown unchanged.
    public func run<T>(_ body: () throws -> T) throws -> T {
        let box = ThreadResultBox<T>()
        let path = self.path
        withoutActuallyEscaping(body) { escapable in
            box.work = escapable
            let done = DispatchSemaphore(value: 0)
            let thread = Thread {
                defer { done.signal() }
                do {
                    try NamespaceSyscalls.enterNetworkNamespace(path: path)
                    box.result = .success(try box.work!())
                } catch {
                    box.result = .failure(error)
                }
            }
            thread.stackSize = 1 << 20
            thread.start()
            done.wait()
            box.work = nil
        }
        return try box.result!.get()
    }
}

private final class ThreadResultBox<T>: @unchecked Sendable {
    var work: (() throws -> T)?
    var result: Result<T, any Error>?
}

extension Optional where Wrapped == NetworkNamespace {
    /// Runs `body` in the namespace, or directly on the calling thread when there is none.
    func run<T>(_ body: () throws -> T) throws -> T {
        switch self {
        case .none: return try body()
        case .some(let ns): return try ns.run(body)
        }
    }
}

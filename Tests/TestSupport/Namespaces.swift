import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// Documentation address ranges (RFC 5737, RFC 3849). Tests use nothing else, never private ranges.
public enum DocumentationAddresses {
    /// 192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24.
    public static let ipv4Networks = ["192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24"]
    /// 2001:db8::/32.
    public static let ipv6Network = "2001:db8::/32"
}

/// A throwaway network namespace made with `ip netns add` (so it is /run/netns/<name>).
public struct TestNamespace: Sendable, Hashable, CustomStringConvertible {
    public let name: String
    public var path: String { "/run/netns/\(name)" }
    public var description: String { name }

    /// The command line that runs `command` inside the namespace: `nsenter --net=<path> -- …`, which execs the
    /// command itself (so signals reach it), or `ip netns exec <name> …` when nsenter is missing.
    public func wrap(_ command: [String]) throws -> (String, [String]) {
        guard let first = command.first else { throw TestSupportError("empty command") }
        let exe = try Tools.require(first)
        if Tools.locate("nsenter") != nil {
            return ("nsenter", ["--net=\(path)", "--", exe] + command.dropFirst())
        }
        return ("ip", ["netns", "exec", name, exe] + command.dropFirst())
    }

    /// Runs `command` inside the namespace.
    public func run(_ command: [String], input: String? = nil, timeout: Double = 60) throws -> ProcessResult {
        let (exe, args) = try wrap(command)
        return try Tools.run(exe, args, input: input, timeout: timeout)
    }

    /// `run`, throwing unless the command succeeded.
    @discardableResult
    public func runChecked(_ command: [String], input: String? = nil, timeout: Double = 60) throws -> ProcessResult {
        let r = try run(command, input: input, timeout: timeout)
        guard r.succeeded else { throw TestSupportError("in netns \(name): \(r)") }
        return r
    }

    /// `ip -n <name> <args…>` (checked).
    @discardableResult
    public func ip(_ args: String...) throws -> ProcessResult {
        try Tools.runChecked("ip", ["-n", name] + args)
    }

    /// `nft <args…>` in this namespace (checked).
    @discardableResult
    public func nft(_ args: String...) throws -> String {
        try runChecked(["nft"] + args).stdout
    }

    /// `nft -f -` with `script` on stdin (checked).
    public func nftScript(_ script: String, timeout: Double = 300) throws {
        try runChecked(["nft", "-f", "-"], input: script, timeout: timeout)
    }

    /// `nft list ruleset` in this namespace.
    public func ruleset() throws -> String { try nft("list", "ruleset") }

    /// A long-running command inside the namespace.
    public func spawn(_ command: [String], readyMarker: String? = nil) throws -> BackgroundProcess {
        let (exe, args) = try wrap(command)
        return try BackgroundProcess(exe, args, readyMarker: readyMarker)
    }

    /// Kills whatever still runs in the namespace and deletes it.
    func destroy() {
        if let pids = try? Tools.run("ip", ["netns", "pids", name], timeout: 10).stdout {
            for p in pids.split(whereSeparator: \.isWhitespace) { if let pid = Int32(p) { kill(pid, SIGKILL) } }
        }
        _ = try? Tools.run("ip", ["netns", "delete", name], timeout: 30)
    }
}

private let namespaceCounter = Counter()
private final class Counter: @unchecked Sendable {
    private let lock = NSLock()
    private var value = 0
    func next() -> Int { lock.lock(); defer { lock.unlock() }; value += 1; return value }
}

/// Creates a uniquely named namespace (loopback up). Prefer `withNamespace`, which always deletes it.
public func makeNamespace(_ label: String = "t") throws -> TestNamespace {
    let safe = String(label.lowercased().map { $0.isLetter || $0.isNumber || $0 == "-" ? $0 : "-" }.prefix(24))
    let ns = TestNamespace(name: "hnd-\(safe)-\(getpid())-\(namespaceCounter.next())")
    try Tools.runChecked("ip", ["netns", "add", ns.name])
    do {
        try ns.ip("link", "set", "lo", "up")
    } catch {
        ns.destroy()
        throw error
    }
    return ns
}

/// Runs `body` with a fresh namespace and deletes the namespace afterwards, whether `body` succeeds or not.
public func withNamespace<T>(_ label: String = "t", _ body: (TestNamespace) throws -> T) throws -> T {
    let ns = try makeNamespace(label)
    defer { ns.destroy() }
    return try body(ns)
}

/// Async variant of `withNamespace`.
public func withNamespace<T>(_ label: String = "t", _ body: (TestNamespace) async throws -> T) async throws -> T {
    let ns = try makeNamespace(label)
    defer { ns.destroy() }
    return try await body(ns)
}

/// `count` fresh namespaces, all deleted afterwards.
public func withNamespaces<T>(_ count: Int, label: String = "t", _ body: ([TestNamespace]) throws -> T) throws -> T {
    var made: [TestNamespace] = []
    defer { for ns in made { ns.destroy() } }
    for i in 0..<count { made.append(try makeNamespace("\(label)\(i)")) }
    return try body(made)
}

/// Two namespaces joined by a veth pair, addressed and up, with default routes pointing at each other:
/// a "node" side (`a`) and a "pod" / "peer" side (`b`).
public struct VethPair: Sendable {
    public let a: TestNamespace
    public let b: TestNamespace
    public let aInterface: String
    public let bInterface: String
    /// Addresses with prefix length, e.g. "192.0.2.1/24".
    public let aAddresses: [String]
    public let bAddresses: [String]

    /// The first address of a family on each side, without prefix length.
    public func aAddress(ipv6: Bool = false) -> String? { VethPair.first(aAddresses, ipv6) }
    public func bAddress(ipv6: Bool = false) -> String? { VethPair.first(bAddresses, ipv6) }

    static func first(_ list: [String], _ v6: Bool) -> String? {
        list.first { $0.contains(":") == v6 }.map { String($0.split(separator: "/")[0]) }
    }
}

/// Connects `a` and `b` with a veth pair (`aInterface` in `a`, `bInterface` in `b`), adds the addresses
/// (IPv6 with `nodad`, so they are usable at once) and brings the links up. With `defaultRoutes`, each side
/// gets default routes (per family) via the other side's first address, so that any destination — e.g. an
/// external IP nobody owns — is routable and reaches the nat output hook.
@discardableResult
public func connect(_ a: TestNamespace, _ b: TestNamespace,
                    aAddresses: [String] = ["192.0.2.1/24", "2001:db8:1::1/64"],
                    bAddresses: [String] = ["192.0.2.2/24", "2001:db8:1::2/64"],
                    aInterface: String = "veth0", bInterface: String = "veth0",
                    defaultRoutes: Bool = true) throws -> VethPair {
    try checkDocumentation(aAddresses + bAddresses)
    // Create the pair inside `a` with the peer moved straight into `b`: names only need to be unique per namespace.
    try Tools.runChecked("ip", ["-n", a.name, "link", "add", aInterface, "type", "veth", "peer", "name", bInterface, "netns", b.name])
    for (ns, ifname, addrs) in [(a, aInterface, aAddresses), (b, bInterface, bAddresses)] {
        for addr in addrs {
            if addr.contains(":") {
                try ns.ip("-6", "addr", "add", addr, "dev", ifname, "nodad")
            } else {
                try ns.ip("addr", "add", addr, "dev", ifname)
            }
        }
        try ns.ip("link", "set", ifname, "up")
    }
    let pair = VethPair(a: a, b: b, aInterface: aInterface, bInterface: bInterface, aAddresses: aAddresses, bAddresses: bAddresses)
    if defaultRoutes {
        for v6 in [false, true] {
            if let gw = pair.bAddress(ipv6: v6), pair.aAddress(ipv6: v6) != nil {
                try a.ip(v6 ? "-6" : "-4", "route", "replace", "default", "via", gw, "dev", aInterface)
            }
            if let gw = pair.aAddress(ipv6: v6), pair.bAddress(ipv6: v6) != nil {
                try b.ip(v6 ? "-6" : "-4", "route", "replace", "default", "via", gw, "dev", bInterface)
            }
        }
    }
    return pair
}

/// Adds extra addresses (e.g. a second server address) to an interface; IPv6 with `nodad`.
public func addAddresses(_ ns: TestNamespace, _ addresses: [String], interface: String = "veth0") throws {
    try checkDocumentation(addresses)
    for addr in addresses {
        if addr.contains(":") { try ns.ip("-6", "addr", "add", addr, "dev", interface, "nodad") } else { try ns.ip("addr", "add", addr, "dev", interface) }
    }
}

/// Refuses anything outside the documentation ranges.
public func checkDocumentation(_ addresses: [String]) throws {
    for a in addresses {
        let host = a.split(separator: "/")[0]
        let ok: Bool
        if host.contains(":") {
            ok = host.lowercased().hasPrefix("2001:db8:") || host.lowercased().hasPrefix("2001:0db8:")
        } else {
            ok = host.hasPrefix("192.0.2.") || host.hasPrefix("198.51.100.") || host.hasPrefix("203.0.113.")
        }
        if !ok { throw TestSupportError("\(a) is not a documentation address (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32)") }
    }
}

// MARK: - Kernel test gate

private final class KernelProbe: @unchecked Sendable {
    static let shared = KernelProbe()
    private let lock = NSLock()
    private var cached: String??
    /// nil when namespaces work; else why not.
    func problem() -> String? {
        lock.lock()
        defer { lock.unlock() }
        if let c = cached { return c }
        let result: String?
        if geteuid() != 0 {
            result = "not running as root (network namespaces need CAP_SYS_ADMIN and CAP_NET_ADMIN)"
        } else if Tools.locate("ip") == nil {
            result = "iproute2 `ip` not found"
        } else {
            do {
                let ns = try makeNamespace("probe")
                ns.destroy()
                result = nil
            } catch {
                result = "cannot create a network namespace: \(error)"
            }
        }
        cached = .some(result)
        return result
    }
}

/// Whether tests that need network namespaces (root, iproute2, a kernel that allows them) can run.
/// Returns false, after printing why, when they cannot and the test may be skipped; under `CI=true` a missing
/// capability is a failure instead: it throws, so the test fails loudly rather than passing vacuously.
/// Also checks that every tool in `tools` (e.g. "nft", "iptables-restore", "python3") exists.
public func requireKernelTests(tools: [String] = [], function: String = #function) throws -> Bool {
    var problem = KernelProbe.shared.problem()
    if problem == nil, let missing = tools.first(where: { Tools.locate($0) == nil }) { problem = "\(missing) not found" }
    guard let problem else { return true }
    if ProcessInfo.processInfo.environment["CI"]?.lowercased() == "true" {
        throw TestSupportError("kernel test \(function) cannot run under CI=true: \(problem)")
    }
    print("skipping \(function): \(problem)")
    return false
}

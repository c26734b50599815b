import NetlinkBackend

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Which kernel interface installs the rules.
public enum Backend: String, CaseIterable, Sendable {
    /// `table inet <table>` over netlink (libnftnl); independent of iptables and of kube-proxy's variant.
    case nftables
    /// `iptables-restore`/`ip6tables-restore` into the variant kube-proxy uses; the only backend that can
    /// jump into kube-proxy's `KUBE-SVC-…` chains.
    case iptables
}

/// The two iptables 1.8 implementations. Rules written with one are invisible to the other's tools, and
/// their nat chains run as separate hooks, so we must write to the one that holds kube-proxy's rules.
public enum IptablesVariant: String, CaseIterable, Sendable {
    /// `ip_tables` setsockopt interface (`iptables-legacy`).
    case legacy
    /// nf_tables with xtables compatibility (`iptables-nft`).
    case nft

    /// How the tools of this variant call themselves.
    public var displayName: String { self == .legacy ? "iptables-legacy" : "iptables-nft" }
}

/// Where a command acts. Every command may act in another network namespace (`--netns NAME|PATH`): a
/// node's namespace seen from a privileged pod, or the namespaces the tests build.
public struct NodeContext: Sendable {
    /// nil: the namespace this process runs in.
    public var netns: NetworkNamespace?

    public init(netns: NetworkNamespace? = nil) { self.netns = netns }

    /// For messages: "network namespace /run/netns/x" or "this network namespace".
    var place: String { netns.map { "network namespace \($0.path)" } ?? "this network namespace" }
}

/// A failure with the exit code the CLI should use (sysexits.h), and a message that says what to do.
public struct NodeError: Error, CustomStringConvertible, Sendable, Equatable {
    /// 77 (EX_NOPERM) missing privilege, 69 (EX_UNAVAILABLE) tools or kernel modules missing, 1 the
    /// kernel or a tool refused the rules, or the node does not hold what the plan needs.
    public var exitCode: Int32
    public var description: String

    public init(exitCode: Int32, description: String) {
        self.exitCode = exitCode; self.description = description
    }

    public static let noPermissionCode: Int32 = 77
    public static let unavailableCode: Int32 = 69
    /// 64 (EX_USAGE): the options conflict with what the node holds (e.g. `--chain` names someone else's chain).
    public static let usageCode: Int32 = 64
    /// 73 (EX_CANTCREAT): the lock file cannot be created.
    public static let cantCreateCode: Int32 = 73

    /// Names the capability, because "Operation not permitted" alone sends people the wrong way.
    static func noPermission(_ what: String, capability: String = "CAP_NET_ADMIN") -> NodeError {
        NodeError(exitCode: noPermissionCode,
                  description: "\(what): permission denied; this needs \(capability) in the target network namespace "
                    + "(run as root, or grant \(capability))")
    }

    /// Entering another namespace (setns) needs CAP_SYS_ADMIN on top of CAP_NET_ADMIN.
    static func noPermissionToEnter(_ what: String, detail: String? = nil) -> NodeError {
        NodeError(exitCode: noPermissionCode,
                  description: "\(what): permission denied\(detail.map { " (\($0))" } ?? ""); entering another network namespace "
                    + "needs CAP_SYS_ADMIN, and changing netfilter there needs CAP_NET_ADMIN (run as root, or grant both)")
    }

    static func unavailable(_ what: String) -> NodeError {
        NodeError(exitCode: unavailableCode, description: what)
    }

    static func refused(_ what: String) -> NodeError {
        NodeError(exitCode: 1, description: what)
    }
}

/// Capability bits from `/proc/self/status` (`CapEff`), checked up front so the message can name the
/// missing capability instead of relaying a tool's "Permission denied (you must be root)".
enum Capabilities {
    static let netAdmin = 12
    static let sysAdmin = 21

    static func effective() -> UInt64? {
        guard let f = fopen("/proc/self/status", "r") else { return nil }
        defer { fclose(f) }
        var line = [CChar](repeating: 0, count: 512)
        while fgets(&line, Int32(line.count), f) != nil {
            let s = String(decoding: line.prefix(while: { $0 != 0 }).map { UInt8(bitPattern: $0) }, as: UTF8.self)
            if s.hasPrefix("CapEff:") {
                let hex = s.dropFirst(7).filter { !$0.isWhitespace }
                return UInt64(hex, radix: 16)
            }
        }
        return nil
    }

    static func has(_ bit: Int) -> Bool {
        guard let caps = effective() else { return true }  // cannot tell: let the kernel decide
        return caps & (1 << UInt64(bit)) != 0
    }

    /// CAP_NET_ADMIN to change netfilter, CAP_SYS_ADMIN to enter another network namespace.
    static func require(for action: String, context: NodeContext) throws(NodeError) {
        if !has(netAdmin) { throw .noPermission(action, capability: "CAP_NET_ADMIN") }
        if context.netns != nil && !has(sysAdmin) {
            throw .noPermissionToEnter("\(action) in \(context.place)")
        }
    }
}

extension NodeContext {
    /// Throws exit 77 naming the capability when this process may not change netfilter here.
    public func requirePrivileges(for action: String) throws(NodeError) {
        try Capabilities.require(for: action, context: self)
    }
}

import KubeObjects
import NetAddress

/// What `apply` did (or, with dry-run, would do).
public struct ApplyResult: Sendable {
    /// The kernel was (or would be) changed; false when it already matched the plan.
    public var changed: Bool
    /// One line per difference between the kernel and the plan before applying.
    public var differences: [String]
    /// One line for the user: backend, where, what, and whether anything changed.
    public var summary: String
    /// Mappings the backend left out, one line each (e.g. `--target kube-proxy` for a service kube-proxy
    /// has no chain for); also at the end of `summary`. Not differences: re-applying does not change them.
    public var warnings: [String]
    /// Kernel objects added and removed (an incremental update counts elements, chains and rules; a full
    /// apply counts the differences it found).
    public var added: Int = 0
    public var removed: Int = 0
    /// True when only the differences were sent (`update(from:to:)`), false for a full replacement.
    public var incremental: Bool = false
    /// iptables: chains declared and filled by the restores (only those whose rules changed), and chains
    /// deleted (`-X`). 0 for nftables.
    public var restoredChains = 0
    public var deletedChains = 0
    /// iptables: the `*-restore --noflush` inputs as they were run, one per family restored (none when
    /// nothing changed), for logs and tests.
    public var restoreInputs: [String] = []

    public init(changed: Bool, differences: [String], summary: String, warnings: [String] = []) {
        self.changed = changed; self.differences = differences; self.summary = summary; self.warnings = warnings
        self.added = differences.filter { $0.hasPrefix("+") }.count
        self.removed = differences.filter { $0.hasPrefix("-") }.count
    }
}

/// One dispatch entry the kernel holds: `externalIP:port/protocol → target`.
public struct StatusMapping: Sendable, Equatable {
    public var family: IPFamily
    public var externalIP: String
    public var `protocol`: String
    public var port: Int
    /// Our chain: `HNDNAT-…` (iptables), `pick4-tcp-3` (nftables), or kube-proxy's `KUBE-SVC-…`.
    public var target: String
    /// Where the target chain DNATs to; empty for a kube-proxy chain.
    public var destinations: [String]
    public var comment: String?
    /// `loadBalancerSourceRanges` the dispatch matches (CIDR text); empty: every source.
    public var sourceRanges: [String]
    /// ClientIP affinity timeout in seconds, when the target keeps clients on their endpoint.
    public var affinityTimeout: Int?

    public init(family: IPFamily, externalIP: String, protocol: String, port: Int, target: String,
                destinations: [String], comment: String?, sourceRanges: [String] = [], affinityTimeout: Int? = nil) {
        self.family = family; self.externalIP = externalIP; self.protocol = `protocol`; self.port = port
        self.target = target; self.destinations = destinations; self.comment = comment
        self.sourceRanges = sourceRanges; self.affinityTimeout = affinityTimeout
    }
}

/// What the kernel holds now, read back (netlink dump for nftables, `iptables-save` for iptables).
public struct NodeStatus: Sendable {
    public var backend: Backend
    /// The namespace path, nil for the current one.
    public var netns: String?
    public var iptablesVariant: IptablesVariant?
    /// Something of ours is in the kernel.
    public var installed: Bool = false
    public var mappings: [StatusMapping] = []
    /// How our rules are hooked in: base chains (nftables) or the OUTPUT/POSTROUTING jumps (iptables).
    public var hooks: [String] = []
    /// Our part of the ruleset as the kernel reports it.
    public var ruleset: String = ""
    /// Things worth a look: duplicate jumps, stale chains, the variant decision.
    public var notes: [String] = []

    public init(backend: Backend, netns: String? = nil, iptablesVariant: IptablesVariant? = nil) {
        self.backend = backend; self.netns = netns; self.iptablesVariant = iptablesVariant
    }

    /// For a terminal.
    public var text: String {
        var out = "backend: \(backend.rawValue)"
        if let v = iptablesVariant { out += " (\(v.displayName))" }
        out += "\nnetwork namespace: \(netns ?? "current")\n"
        guard installed else {
            out += "installed: no (nothing of ours in the kernel)\n"
            for n in notes { out += "note: \(n)\n" }
            return out
        }
        out += "installed: yes\n"
        for h in hooks { out += "hook: \(h)\n" }
        out += "mappings: \(mappings.count)\n"
        for m in mappings {
            let ext = m.family == .ipv6 ? "[\(m.externalIP)]" : m.externalIP
            out += "  \(ext):\(m.port)/\(m.protocol) -> "
            out += m.destinations.isEmpty ? m.target : m.destinations.joined(separator: ", ")
            if !m.sourceRanges.isEmpty { out += "  from \(m.sourceRanges.joined(separator: ", "))" }
            if let t = m.affinityTimeout { out += "  affinity ClientIP \(t)s" }
            if let c = m.comment { out += "  (\(c))" }
            out += "\n"
        }
        for n in notes { out += "note: \(n)\n" }
        if !ruleset.isEmpty { out += "ruleset:\n" + ruleset.split(separator: "\n", omittingEmptySubsequences: false).map { $0.isEmpty ? "" : "  \($0)" }.joined(separator: "\n") }
        if !out.hasSuffix("\n") { out += "\n" }
        return out
    }

    /// One JSON object, keys in a fixed order.
    public var json: String {
        func str(_ s: String?) -> JSON { s.map(JSON.string) ?? .null }
        let value = JSON.object([
            ("backend", .string(backend.rawValue)),
            ("netns", str(netns)),
            ("iptablesVariant", str(iptablesVariant?.rawValue)),
            ("installed", .bool(installed)),
            ("mappings", .array(mappings.map { m in
                .object([
                    ("family", .string(m.family.rawValue)),
                    ("externalIP", .string(m.externalIP)),
                    ("protocol", .string(m.protocol)),
                    ("port", .int(m.port)),
                    ("target", .string(m.target)),
                    ("destinations", .array(m.destinations.map(JSON.string))),
                    ("comment", str(m.comment)),
                    ("sourceRanges", .array(m.sourceRanges.map(JSON.string))),
                    ("affinityTimeoutSeconds", m.affinityTimeout.map(JSON.int) ?? .null),
                ])
            })),
            ("hooks", .array(hooks.map(JSON.string))),
            ("notes", .array(notes.map(JSON.string))),
            ("ruleset", .string(ruleset)),
        ])
        return value.serialized + "\n"
    }
}

/// A tiny JSON value: enough for status output without pulling Foundation into the node backend.
indirect enum JSON: Sendable {
    case null
    case bool(Bool)
    case int(Int)
    case string(String)
    case array([JSON])
    /// Ordered keys, so output is stable.
    case object([(String, JSON)])

    var serialized: String {
        switch self {
        case .null: return "null"
        case .bool(let b): return b ? "true" : "false"
        case .int(let i): return String(i)
        case .string(let s): return JSON.quote(s)
        case .array(let a): return "[" + a.map(\.serialized).joined(separator: ",") + "]"
        case .object(let o): return "{" + o.map { JSON.quote($0.0) + ":" + $0.1.serialized }.joined(separator: ",") + "}"
        }
    }

    static func quote(_ s: String) -> String { JSONValue.quoted(s) }
}

import NetAddress
import NetlinkBackend

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The save/restore pair of one variant and family, run in the target namespace.
struct IptablesTools: Sendable {
    let variant: IptablesVariant
    let family: IPFamily
    let command: NamespacedCommand

    var prefix: String { family == .ipv4 ? "iptables" : "ip6tables" }
    var saveTool: String { "\(prefix)-\(variant.rawValue)-save" }
    var restoreTool: String { "\(prefix)-\(variant.rawValue)-restore" }
    var name: String { "\(prefix)-\(variant.rawValue)" }
    static let package = "iptables (1.8 or later)"

    var installed: Bool { ProcessRunner.find(saveTool) != nil && ProcessRunner.find(restoreTool) != nil }

    /// Every table of this variant. No `-t`: with iptables-legacy, naming a table makes the kernel create
    /// it, and reading must never change the node.
    func save() throws(NodeError) -> SavedRuleset {
        let out = try command.run(saveTool, [], package: Self.package)
        if !out.succeeded {
            throw classify(out, action: "reading the \(name) rules", input: nil)
        }
        return SavedRuleset.parse(out.stdout)
    }

    /// `*-restore --noflush -w`: declares and flushes only the chains the input names; one commit per table.
    func restore(_ input: String) throws(NodeError) {
        let out = try command.run(restoreTool, ["--noflush", "--wait=30"], stdin: input, package: Self.package)
        if !out.succeeded {
            throw classify(out, action: "loading rules with \(restoreTool) --noflush", input: input)
        }
    }

    /// The same, with the input handed over in chunks as they are made. Returns the whole input.
    func restore(chunks next: () -> [UInt8]?) throws(NodeError) -> [UInt8] {
        var sent: [UInt8] = []
        let out = try withoutActuallyEscaping(next) { (next) throws(NodeError) -> ProcessOutput in
            try command.run(restoreTool, ["--noflush", "--wait=30"], stdinChunks: {
                let chunk = next()
                if let chunk { sent += chunk }
                return chunk
            }, package: Self.package)
        }
        if !out.succeeded {
            throw classify(out, action: "loading rules with \(restoreTool) --noflush", input: String(decoding: sent, as: UTF8.self))
        }
        return sent
    }

    /// Turns a tool's stderr into the exit code and a message that names the cause.
    func classify(_ out: ProcessOutput, action: String, input: String?) -> NodeError {
        let err = out.stderr.split(separator: "\n").filter { !$0.hasPrefix("# Warning") }.joined(separator: "\n").trimmed
        let lower = err.lowercased()
        var failing = ""
        if let input, let range = err.range(of: "line: ") ?? err.range(of: "line "),
           let n = Int(err[range.upperBound...].prefix(while: \.isNumber)) {
            let lines = input.split(separator: "\n", omittingEmptySubsequences: false)
            if n >= 1 && n <= lines.count { failing = "\n  failing input line \(n): \(lines[n - 1])" }
        }
        if lower.contains("permission denied") || lower.contains("you must be root") || lower.contains("operation not permitted") {
            return .noPermission("\(action) in \(command.context.place) (\(err))")
        }
        if lower.contains("insmod") || lower.contains("table does not exist") || lower.contains("unable to initialize table")
            || lower.contains("kernel module") || lower.contains("not supported") || lower.contains("protocol not supported")
            || lower.contains("address family not supported") {
            let modules = variant == .legacy
                ? (family == .ipv4 ? "ip_tables, iptable_nat" : "ip6_tables, ip6table_nat")
                : "nf_tables, nft_compat, nft_chain_nat"
            return .unavailable("\(action) failed because the kernel lacks a netfilter feature: \(err)\(failing)\n"
                + "  needed modules: \(modules), nf_nat, nf_conntrack, xt_comment, xt_statistic, xt_conntrack, xt_tcpudp, xt_MASQUERADE "
                + "(load them with modprobe on the node, or choose the other variant with --iptables)")
        }
        let detail = err.isEmpty ? "exit status \(out.status)" : err
        return .refused("\(action) in \(command.context.place) failed: \(detail)\(failing)")
    }
}

/// What a variant's dumps say about kube-proxy / kubelet.
struct VariantEvidence: Sendable {
    var variant: IptablesVariant
    var installed: Bool
    /// kubelet's marker chains (KUBE-IPTABLES-HINT in mangle, KUBE-KUBELET-CANARY).
    var kubeletMarkers: [String] = []
    /// Families whose nat table has KUBE-SERVICES (kube-proxy in iptables or IPVS mode).
    var kubeServicesFamilies: [IPFamily] = []
    /// Number of rules in KUBE-* chains, all tables and families: who holds kube-proxy's rules.
    var kubeRuleCount = 0
    var errors: [String] = []

    var hasKubeProxy: Bool { !kubeServicesFamilies.isEmpty }
    var hasAnyMarker: Bool { hasKubeProxy || !kubeletMarkers.isEmpty }

    /// Reads both families' dumps; never throws (a variant that cannot be read is simply not the one).
    static func gather(_ variant: IptablesVariant, command: NamespacedCommand) -> VariantEvidence {
        var ev = VariantEvidence(variant: variant, installed: false)
        for family in IPFamily.allCases {
            let tools = IptablesTools(variant: variant, family: family, command: command)
            guard tools.installed else { continue }
            ev.installed = true
            let saved: SavedRuleset
            do { saved = try tools.save() } catch { ev.errors.append("\(tools.saveTool): \(error.description)"); continue }
            for tableName in saved.tableOrder {
                guard let table = saved.tables[tableName] else { continue }
                for chain in table.chainOrder {
                    if chain == "KUBE-IPTABLES-HINT" || chain == "KUBE-KUBELET-CANARY" {
                        ev.kubeletMarkers.append("chain \(chain) in \(tools.name) \(tableName) table")
                    }
                    if chain.hasPrefix("KUBE-") { ev.kubeRuleCount += table.rules(chain).count }
                }
                if tableName == "nat" && table.hasChain("KUBE-SERVICES") { ev.kubeServicesFamilies.append(family) }
            }
        }
        return ev
    }
}

extension IptablesVariant {
    /// Which variant holds kube-proxy's rules, decided the way kube-proxy's iptables-wrapper decides:
    /// kube-proxy's/kubelet's chains in one variant's dump win (the one with more KUBE- rules if both
    /// have them); otherwise the variant `iptables --version` reports; otherwise whichever is installed.
    public static func detect(in context: NodeContext) throws(NodeError) -> (IptablesVariant, reason: String) {
        let command = NamespacedCommand(context: context)
        let nft = VariantEvidence.gather(.nft, command: command)
        let legacy = VariantEvidence.gather(.legacy, command: command)
        // Without iptables-nft's tools its chains are still visible over netlink (as ProxyDetection sees
        // them): kube-proxy is there, so that is the variant (whose missing tools are then reported),
        // never the other one.
        if !nft.installed && !legacy.hasKubeProxy,
           (try? NftablesNetlink(namespace: context.netns).chainExists(family: .ip, table: "nat", chain: "KUBE-SERVICES")) == true {
            return (.nft, "chain KUBE-SERVICES is in nftables table ip nat (iptables-nft, read over netlink)")
        }
        return try choose(nft: nft, legacy: legacy, command: command)
    }

    static func choose(nft: VariantEvidence, legacy: VariantEvidence, command: NamespacedCommand) throws(NodeError) -> (IptablesVariant, reason: String) {
        func describe(_ e: VariantEvidence) -> String {
            var parts: [String] = []
            if !e.kubeServicesFamilies.isEmpty {
                parts.append("KUBE-SERVICES in the \(e.kubeServicesFamilies.map(\.rawValue).joined(separator: "/")) nat table")
            }
            parts += e.kubeletMarkers
            return parts.joined(separator: ", ") + " (\(e.kubeRuleCount) KUBE- rules)"
        }
        switch (nft.hasAnyMarker, legacy.hasAnyMarker) {
        case (true, false):
            return (.nft, "kube-proxy/kubelet chains are in iptables-nft: \(describe(nft))")
        case (false, true):
            return (.legacy, "kube-proxy/kubelet chains are in iptables-legacy: \(describe(legacy))")
        case (true, true):
            // kube-proxy's own chain beats kubelet's markers; then the bigger ruleset.
            if nft.hasKubeProxy != legacy.hasKubeProxy {
                let v: IptablesVariant = nft.hasKubeProxy ? .nft : .legacy
                let e = v == .nft ? nft : legacy
                return (v, "both variants have kubelet chains; kube-proxy's KUBE-SERVICES is in \(v.displayName): \(describe(e))")
            }
            let v: IptablesVariant = legacy.kubeRuleCount > nft.kubeRuleCount ? .legacy : .nft
            return (v, "both variants hold KUBE- chains; \(v.displayName) has more kube-proxy rules "
                    + "(nft: \(nft.kubeRuleCount), legacy: \(legacy.kubeRuleCount))")
        case (false, false):
            break
        }
        if !nft.installed && !legacy.installed {
            throw .unavailable("neither iptables-nft nor iptables-legacy is installed (package \(IptablesTools.package))")
        }
        if ProcessRunner.find("iptables") != nil, let out = try? command.run("iptables", ["--version"], package: IptablesTools.package),
           out.succeeded {
            let v = out.stdout.trimmed
            if v.contains("(legacy)") && legacy.installed {
                return (.legacy, "no kube-proxy chains in either variant; `iptables --version` says \(v)")
            }
            if v.contains("nf_tables") && nft.installed {
                return (.nft, "no kube-proxy chains in either variant; `iptables --version` says \(v)")
            }
        }
        let v: IptablesVariant = nft.installed ? .nft : .legacy
        return (v, "no kube-proxy chains in either variant; only \(v.displayName) is installed")
    }
}

/// Serialises our own read-modify-write of iptables (the xtables lock covers one restore, not our
/// read, decide, restore sequence), so two applies at once give one plan or the other, never a merge.
///
/// One fixed path, `/run/hostnet-dnat/iptables.lock` (beside the node locks, so one host directory mounted
/// into a pod holds both): no fallback, because two processes that fall back differently (one can write
/// /run, one cannot) would each hold a different lock. Opened with O_NOFOLLOW, so a symlink planted there
/// is refused rather than followed. When it cannot be opened, apply and remove fail with exit 73 instead of
/// going on unserialised; `apply --dry-run`, `diff` and `status` take no lock.
enum ApplyLock {
    static let path = NodeLock.directory + "/iptables.lock"

    static func withLock<T>(_ body: () throws(NodeError) -> T) throws(NodeError) -> T {
        _ = mkdir(NodeLock.directory, 0o700)
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0o600)
        guard fd >= 0 else {
            let why = String(cString: strerror(errno))
            throw NodeError(exitCode: NodeError.cantCreateCode, description:
                "cannot open the lock file \(path) (\(why)); it keeps two runs from mixing their rules. "
                + "Make \(NodeLock.directory) writable for this process (in a pod: mount the host's \(NodeLock.directory) there)"
                + (errno == ELOOP ? ", and remove the symlink at \(path)" : ""))
        }
        defer { close(fd) }
        while flock(fd, LOCK_EX) != 0 && errno == EINTR {}
        defer { _ = flock(fd, LOCK_UN) }
        return try body()
    }
}

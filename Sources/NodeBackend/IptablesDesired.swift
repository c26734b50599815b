import NetAddress
import RulePlanning
import ServiceResolution

/// What a plan wants in one family's nat table: our chains and their rules, built straight from the plan
/// in the exact spelling `iptables-save` prints them (checked against iptables-legacy and iptables-nft
/// 1.8.9), so comparing with a dump is a byte comparison per rule and the same lines serve as restore input.
/// Rules are never rendered as text and parsed back.
struct IptablesDesired: Sendable {
    var family: IPFamily
    /// Our chains in declaration order: the main chain, the masquerade chain (if on), the target chains.
    var chainOrder: [String] = []
    /// chain -> its rules without the leading `-A CHAIN `, in iptables-save form.
    var rules: [String: [String]] = [:]
    /// kube-proxy chains the plan jumps to, with the service they stand for (skipped ones included).
    var kubeChains: [(chain: String, comment: String)]
    var mappings: Int
    /// Distinct chains the main chain jumps to (ours or kube-proxy's).
    var targetChainCount = 0
    /// Mappings left out because kube-proxy has no chain for them here, one warning line each.
    var skipped: [String] = []
    var isEmpty: Bool { mappings == 0 }

    /// `missingKubeChains`: kube-proxy chains that do not exist in this family's nat table; the mappings
    /// that jump to them are left out (and their masquerade rules, unless another mapping keeps the address).
    init(plan: RulePlan, family: IPFamily, missingKubeChains: Set<String> = [], place: String = "") {
        self.family = family
        let s = plan.settings
        let chains = plan.targetChains(family)
        kubeChains = chains.compactMap { c in
            if case .kubeProxyChain(let name) = c.target { return (name, c.comment) }
            return nil
        }
        let hostBits = family == .ipv4 ? "/32" : "/128"
        var dispatch: [String] = []
        var masquerade: [String] = []
        var lastAddress: IPAddress?
        var targets = Set<String>()
        var comments: [Int: String] = [:]
        var kept = 0
        for r in plan.rules where r.mapping.family == family {
            let chain = plan.targetChains[r.targetIndex]
            let m = r.mapping
            if case .kubeProxyChain(let name) = chain.target, missingKubeChains.contains(name) {
                skipped.append("skipped \(m.externalIP) \(m.protocol.lowercased)/\(m.port) (\(chain.comment)): kube-proxy has no chain "
                               + "\(name)\(place); it creates none for a service without endpoints, or with both traffic policies Local")
                continue
            }
            let comment: String
            if let c = comments[r.targetIndex] { comment = c } else {
                comment = Self.saveQuoted(chain.comment); comments[r.targetIndex] = comment
            }
            let proto = m.protocol.lowercased
            let target = chain.jumpTarget
            let address = m.externalIP.description
            // With loadBalancerSourceRanges, one rule per block (iptables-save prints `-s` before `-d`).
            let rule = "-d \(address)\(hostBits) -p \(proto) -m \(proto) --dport \(m.port) -m comment --comment \(comment) -j \(target)"
            if m.sourceRanges.isEmpty { dispatch.append(rule) } else {
                for block in m.sourceRanges { dispatch.append("-s \(block) " + rule) }
            }
            kept += 1
            targets.insert(target)
            // Rules are sorted by address within a family: one masquerade rule per distinct kept address.
            if s.masquerade && lastAddress != m.externalIP {
                masquerade.append("-m conntrack --ctstate DNAT --ctorigdst \(address) -j MASQUERADE")
            }
            lastAddress = m.externalIP
        }
        mappings = kept
        targetChainCount = targets.count
        guard mappings > 0 else { return }
        chainOrder.append(s.chain)
        rules[s.chain] = dispatch
        if s.masquerade {
            chainOrder.append(s.masqueradeChain)
            rules[s.masqueradeChain] = masquerade
        }
        var probabilities = Probabilities()
        for chain in chains where !chain.isKubeProxyJump {
            let destinations = chain.target.destinations
            let prefix = "-p \(chain.protocol.lowercased) -m comment --comment \(Self.saveQuoted(chain.comment))"
            var lines: [String] = []
            lines.reserveCapacity(destinations.count)
            // ClientIP affinity: the `recent` matches as iptables-save prints them (docs/ruleset.md).
            let mask = family == .ipv4 ? "255.255.255.255" : "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
            func set(_ d: Destination) -> String { " -m recent --set --name \(chain.affinityName(d)) --mask \(mask) --rsource" }
            if let seconds = chain.affinityTimeout {
                for d in destinations {
                    lines.append("\(prefix) -m recent --rcheck --seconds \(seconds) --reap --name \(chain.affinityName(d)) --mask \(mask) --rsource"
                                 + "\(set(d)) -j DNAT --to-destination \(d)")
                }
            }
            for (i, d) in destinations.enumerated() {
                let remaining = destinations.count - i
                let spread = remaining > 1 ? " -m statistic --mode random --probability \(probabilities.saved(remaining))" : ""
                lines.append("\(prefix)\(spread)\(chain.affinityTimeout == nil ? "" : set(d)) -j DNAT --to-destination \(d)")
            }
            chainOrder.append(chain.iptablesName)
            rules[chain.iptablesName] = lines
        }
    }

    /// The restore lines that create (or flush) and fill `chains`: declarations first, then the rules, so a
    /// rule may jump to any chain declared in the same file.
    func restoreLines(_ chains: [String]) -> [String] {
        var out = chains.map { ":\($0) - [0:0]" }
        out.reserveCapacity(chains.count + chains.reduce(0) { $0 + (rules[$1]?.count ?? 0) })
        for chain in chains {
            for r in rules[chain] ?? [] { out.append("-A \(chain) \(r)") }
        }
        return out
    }

    /// `restoreLines(chains)`, each line ending in a newline, appended to one string: a full apply at 10k
    /// Services writes ~160k lines, and building each as its own string and joining them cost as much again.
    func appendRestoreText(_ chains: [String], to out: inout String) {
        var size = 0
        for chain in chains {
            size += chain.utf8.count + 8
            for r in rules[chain] ?? [] { size += chain.utf8.count + r.utf8.count + 5 }
        }
        out.reserveCapacity(out.utf8.count + size)
        for chain in chains { out += ":"; out += chain; out += " - [0:0]\n" }
        for chain in chains {
            for r in rules[chain] ?? [] { out += "-A "; out += chain; out += " "; out += r; out += "\n" }
        }
    }

    /// Every chain, as a full apply into an empty table writes it.
    var body: [String] { restoreLines(chainOrder) }

    /// `xtables_save_string`: bare when only `[A-Za-z0-9_-]`, else in double quotes with `"`, `\` and `'`
    /// escaped by a backslash.
    static func saveQuoted(_ s: String) -> String {
        let bare = !s.isEmpty && s.utf8.allSatisfy { b in
            (b >= 0x30 && b <= 0x39) || (b >= 0x41 && b <= 0x5A) || (b >= 0x61 && b <= 0x7A) || b == 0x5F || b == 0x2D
        }
        if bare { return s }
        var out = "\""
        for ch in s.unicodeScalars {
            if ch == "\"" || ch == "\\" || ch == "'" { out.unicodeScalars.append("\\") }
            out.unicodeScalars.append(ch)
        }
        return out + "\""
    }
}

/// `--probability` as iptables-save prints it for what the renderer writes (kube-proxy's `%0.10f` of 1/n):
/// the kernel keeps `lround(2^31 · p)` and save prints that fraction with `%.11f`, e.g. 1/3 is written
/// 0.3333333333 and read back as 0.33333333349.
struct Probabilities {
    private var cache: [Int: String] = [:]

    mutating func saved(_ n: Int) -> String {
        if let s = cache[n] { return s }
        let s = Self.savedForm(written: Self.written(n))
        cache[n] = s
        return s
    }

    /// 1/n rounded to 10 decimals, as `IptablesRenderer` writes it.
    static func written(_ n: Int) -> String {
        let scale = 10_000_000_000
        let scaled = (scale * 2 + n) / (2 * n)
        let frac = String(scaled % scale)
        return "\(scaled / scale)." + String(repeating: "0", count: 10 - frac.count) + frac
    }

    /// What the kernel stores for `written` and save prints back: `lround(0x80000000 * strtod(p))`, then
    /// `%.11f` of k / 2^31, computed exactly in integers (k · 10^11 / 2^31 = k · 5^11 / 2^20, half to even
    /// like glibc's printf).
    static func savedForm(written: String) -> String {
        guard let p = Double(written) else { return written }
        let k = Int64((p * 2_147_483_648).rounded())
        let scaled = k * 48_828_125  // 5^11; k ≤ 2^31, so this stays below 2^57
        var q = scaled >> 20
        let r = scaled & 0xFFFFF
        if r > 0x80000 || (r == 0x80000 && q & 1 == 1) { q += 1 }
        let unit: Int64 = 100_000_000_000
        let frac = String(q % unit)
        return "\(q / unit)." + String(repeating: "0", count: 11 - frac.count) + frac
    }
}

extension TargetChain {
    /// Where the dispatch rule jumps: our chain, or kube-proxy's `KUBE-SVC-…`.
    var jumpTarget: String {
        if case .kubeProxyChain(let name) = target { return name }
        return iptablesName
    }
}

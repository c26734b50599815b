#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
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
    /// Every chain's rules as restore lines (`-A CHAIN rule\n`), chain after chain in `chainOrder`: one
    /// buffer instead of ~190k strings at 10k Services, copied into the restore input by ranges.
    fileprivate(set) var lines: [UInt8] = []
    /// Where each chain's lines are in `lines`, and how many rules it has.
    fileprivate(set) var spans: [String: Span] = [:]
    struct Span: Sendable { var range: Range<Int>; var count: Int }
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
        self.init(building: Builder(plan: plan, family: family, missingKubeChains: missingKubeChains, place: place))
    }

    /// Everything `builder` can still add.
    init(building builder: Builder) {
        var b = builder
        while b.addTargetChains(upTo: .max) != nil {}
        self = b.finished
    }

    /// Builds the desired rules in steps, so a restore can start reading the first target chains while the
    /// rest are still being written (`IptablesBackend.applyFresh`): the dispatch and masquerade chains at
    /// once (they need every rule), then the target chains in batches.
    struct Builder {
        private var desired: IptablesDesired
        private var out: LineWriter
        private let plan: RulePlan
        private var comments: [String?]
        private var next = 0
        private var probabilities = Probabilities()
        private let mask: String
        /// Only the target chains at these plan indices, ascending (nil: all of them).
        private let only: [Int]?
        private var nextOnly = 0

        /// `only`, `dispatch: false`: just the target chains at those indices of `plan.targetChains`
        /// (ascending), without the dispatch and masquerade chains (an update that changes a few chains;
        /// `mappings` and `targetChainCount` still count every kept mapping and chain).
        init(plan: RulePlan, family: IPFamily, missingKubeChains: Set<String> = [], place: String = "",
             only: [Int]? = nil, dispatch writeDispatch: Bool = true) {
            self.plan = plan
            self.only = only
            let s = plan.settings
            desired = IptablesDesired(family: family, kubeChains: [], mappings: 0)
            mask = family == .ipv4 ? " --mask 255.255.255.255 --rsource" : " --mask ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff --rsource"
            let hostBits = family == .ipv4 ? "/32 -p " : "/128 -p "
            var masquerade = LineWriter(chain: s.masqueradeChain)
            var dispatch = LineWriter(chain: s.chain)
            if writeDispatch { dispatch.bytes.reserveCapacity(plan.rules.count * 140) }
            var lastAddress: IPAddress?
            var address = ""
            // Per target chain (by plan index): its quoted comment, made once.
            var comments = [String?](repeating: nil, count: plan.targetChains.count)
            var counted = [Bool](repeating: false, count: plan.targetChains.count)
            var kept = 0
            var targets = 0
            var skipped: [String] = []
            var kubeChains: [(chain: String, comment: String)] = []
            // Elements are read in place (no copy of a chain or rule per step: at 10k Services the copies'
            // reference counting cost more than the rest of an update).
            plan.targetChains.withUnsafeBufferPointer { chains in
                for i in chains.indices where chains[i].family == family && chains[i].isKubeProxyJump {
                    kubeChains.append((chains[i].jumpTarget, chains[i].comment))
                }
                plan.rules.withUnsafeBufferPointer { rules in
                    for ri in rules.indices where rules[ri].mapping.family == family {
                        let ti = rules[ri].targetIndex
                        if chains[ti].isKubeProxyJump, missingKubeChains.contains(chains[ti].jumpTarget) {
                            let m = rules[ri].mapping
                            skipped.append("skipped \(m.externalIP) \(m.protocol.lowercased)/\(m.port) (\(chains[ti].comment)): kube-proxy has no chain "
                                           + "\(chains[ti].jumpTarget)\(place); it creates none for a service without endpoints, or with both traffic policies Local")
                            continue
                        }
                        kept += 1
                        if !counted[ti] { counted[ti] = true; targets += 1 }
                        guard writeDispatch else { continue }
                        let comment: String
                        if let c = comments[ti] { comment = c } else {
                            comment = IptablesDesired.saveQuoted(chains[ti].comment); comments[ti] = comment
                        }
                        let m = rules[ri].mapping
                        let proto = m.protocol.lowercased
                        let target = chains[ti].jumpTarget
                        // Rules are sorted by address within a family: consecutive mappings often share it.
                        if lastAddress != m.externalIP { address = m.externalIP.description }
                        func rule(source block: CIDR?) {
                            dispatch.begin()
                            if let block { dispatch.put("-s "); dispatch.put(block.description); dispatch.put(" ") }
                            dispatch.put("-d "); dispatch.put(address); dispatch.put(hostBits); dispatch.put(proto)
                            dispatch.put(" -m "); dispatch.put(proto); dispatch.put(" --dport "); dispatch.put(String(m.port))
                            dispatch.put(" -m comment --comment "); dispatch.put(comment); dispatch.put(" -j "); dispatch.put(target)
                            dispatch.end()
                        }
                        // With loadBalancerSourceRanges, one rule per block (iptables-save prints `-s` before `-d`).
                        if m.sourceRanges.isEmpty { rule(source: nil) } else { for block in m.sourceRanges { rule(source: block) } }
                        // One masquerade rule per distinct kept address.
                        if s.masquerade && lastAddress != m.externalIP {
                            masquerade.begin()
                            masquerade.put("-m conntrack --ctstate DNAT --ctorigdst "); masquerade.put(address); masquerade.put(" -j MASQUERADE")
                            masquerade.end()
                        }
                        lastAddress = m.externalIP
                    }
                }
            }
            desired.kubeChains = kubeChains
            desired.skipped = skipped
            self.comments = comments
            desired.mappings = kept
            desired.targetChainCount = targets
            // One buffer: the dispatch chain's lines (moved, not copied), the masquerade chain's, then each target chain's.
            out = dispatch
            dispatch = LineWriter(chain: "")
            guard kept > 0 else { next = plan.targetChains.count; nextOnly = only?.count ?? 0; out.bytes = []; return }
            guard writeDispatch else { return }
            out.bytes.reserveCapacity(out.bytes.count * 3)
            desired.add(s.chain, 0..<out.bytes.count, count: out.count)
            if s.masquerade {
                let from = out.bytes.count
                out.bytes += masquerade.bytes
                desired.add(s.masqueradeChain, from..<out.bytes.count, count: masquerade.count)
            }
            desired.spans.reserveCapacity(plan.targetChains.count + 2)
        }

        /// How many bytes of lines (`-A CHAIN …\n`) are written so far; spans and ranges point into them.
        var byteCount: Int { out.bytes.count }

        /// Appends `bytes[range]` to `chunk` (without holding on to the buffer, which grows on).
        func copyBytes(_ range: Range<Int>, into chunk: inout [UInt8]) {
            out.bytes.withUnsafeBufferPointer { chunk += UnsafeBufferPointer(rebasing: $0[range]) }
        }

        /// What was built, once `addTargetChains` returned nil.
        var finished: IptablesDesired {
            var d = desired
            d.lines = out.bytes
            return d
        }

        /// The dispatch and masquerade chains (already written), as `finished` will list them.
        var headChains: [String] { desired.chainOrder }

        /// Writes the next target chains of this family (at most `limit`): their names and where their lines
        /// are in `bytes`. nil when there are none left.
        mutating func addTargetChains(upTo limit: Int) -> (chains: [String], range: Range<Int>)? {
            let family = desired.family
            let start = out.bytes.count
            var names: [String] = []
            while names.count < limit {
                let index: Int
                if let only {
                    guard nextOnly < only.count else { break }
                    index = only[nextOnly]
                    nextOnly += 1
                } else {
                    guard next < plan.targetChains.count else { break }
                    index = next
                    next += 1
                }
                let chain = plan.targetChains[index]
                guard chain.family == family, !chain.isKubeProxyJump else { continue }
                let destinations = chain.target.destinations
                out.startChain(chain.iptablesName)
                let from = out.bytes.count
                let prefix = "-p \(chain.protocol.lowercased) -m comment --comment \(comments[index] ?? IptablesDesired.saveQuoted(chain.comment))"
                // ClientIP affinity: the `recent` matches as iptables-save prints them (docs/ruleset.md).
                if let seconds = chain.affinityTimeout {
                    for d in destinations {
                        out.begin(); out.put(prefix); out.put(" -m recent --rcheck --seconds "); out.put(String(seconds))
                        out.put(" --reap --name "); out.put(chain.affinityName(d)); out.put(mask)
                        out.put(" -m recent --set --name "); out.put(chain.affinityName(d)); out.put(mask)
                        out.put(" -j DNAT --to-destination "); out.put(d)
                        out.end()
                    }
                }
                for (i, d) in destinations.enumerated() {
                    let remaining = destinations.count - i
                    out.begin(); out.put(prefix)
                    if remaining > 1 { out.put(" -m statistic --mode random --probability "); out.put(probabilities.saved(remaining)) }
                    if chain.affinityTimeout != nil { out.put(" -m recent --set --name "); out.put(chain.affinityName(d)); out.put(mask) }
                    out.put(" -j DNAT --to-destination "); out.put(d)
                    out.end()
                }
                desired.add(chain.iptablesName, from..<out.bytes.count, count: out.count)
                names.append(chain.iptablesName)
            }
            return names.isEmpty ? nil : (names, start..<out.bytes.count)
        }
    }

    private init(family: IPFamily, kubeChains: [(chain: String, comment: String)], mappings: Int) {
        self.family = family; self.kubeChains = kubeChains; self.mappings = mappings
    }

    fileprivate mutating func add(_ chain: String, _ range: Range<Int>, count: Int) {
        chainOrder.append(chain)
        spans[chain] = Span(range: range, count: count)
    }

    /// Appends `-A CHAIN …\n` lines to a byte buffer, counting the lines of the current chain.
    private struct LineWriter {
        var bytes: [UInt8] = []
        var count = 0
        var head: String
        init(chain: String) { head = "-A \(chain) " }
        mutating func startChain(_ chain: String) { head = "-A \(chain) "; count = 0 }
        mutating func begin() { bytes.append(contentsOf: head.utf8) }
        mutating func put(_ s: String) {
            // A native string's bytes in one copy (the generic append walks them one by one).
            if s.utf8.withContiguousStorageIfAvailable({ bytes.append(contentsOf: $0) }) == nil { bytes.append(contentsOf: s.utf8) }
        }
        /// `ip:port`, `[ip6]:port`: what `Destination.description` says, without building that string.
        mutating func put(_ d: Destination) {
            if d.ip.family == .ipv6 { bytes.append(UInt8(ascii: "[")); put(d.ip.description); bytes.append(UInt8(ascii: "]")) }
            else { put(d.ip.description) }
            bytes.append(UInt8(ascii: ":")); put(String(d.port))
        }
        mutating func end() { bytes.append(0x0A); count += 1 }
    }

    /// One chain's rules without the leading `-A CHAIN ` (for differences and tests; comparisons use
    /// `holdsSameRules`).
    func rules(_ chain: String) -> [String] {
        guard let span = spans[chain] else { return [] }
        let skip = chain.utf8.count + 4
        return lines[span.range].split(separator: 0x0A).map { String(decoding: $0.dropFirst(skip), as: UTF8.self) }
    }

    /// How many rules `chain` has.
    func ruleCount(_ chain: String) -> Int { spans[chain]?.count ?? 0 }

    /// Every rule of every chain, in order.
    var allRules: [String] { chainOrder.flatMap { rules($0) } }

    /// Whether `have` (read from the kernel) is exactly this chain's rules, byte for byte.
    func holdsSameRules(_ chain: String, as have: [SavedRuleset.Rule]) -> Bool {
        guard let span = spans[chain], span.count == have.count else { return false }
        let skip = chain.utf8.count + 4
        return lines.withUnsafeBufferPointer { buffer in
            var start = span.range.lowerBound
            for rule in have {
                guard let newline = buffer[start..<span.range.upperBound].firstIndex(of: 0x0A) else { return false }
                let want = UnsafeBufferPointer(rebasing: buffer[(start + skip)..<newline])
                var text = rule.text
                let same = text.withUTF8 { $0.count == want.count && (want.isEmpty || memcmp($0.baseAddress!, want.baseAddress!, want.count) == 0) }
                if !same { return false }
                start = newline + 1
            }
            return true
        }
    }

    /// The restore lines that create (or flush) and fill `chains`, appended to `out`: declarations first, so a
    /// rule may jump to any chain declared in the same file, then the chains' lines copied from `lines` (all
    /// of it at once when every chain is written).
    func appendRestoreText(_ chains: [String], to out: inout String) {
        var size = 0
        for chain in chains { size += chain.utf8.count + 8 + (spans[chain]?.range.count ?? 0) }
        out.reserveCapacity(out.utf8.count + size)
        for chain in chains { out += ":"; out += chain; out += " - [0:0]\n" }
        lines.withUnsafeBufferPointer { buffer in
            if chains == chainOrder {
                out += String(decoding: buffer, as: UTF8.self)
                return
            }
            for chain in chains {
                guard let span = spans[chain] else { continue }
                out += String(decoding: UnsafeBufferPointer(rebasing: buffer[span.range]), as: UTF8.self)
            }
        }
    }

    /// `xtables_save_string`: bare when only `[A-Za-z0-9_-]`, else in double quotes with `"`, `\` and `'`
    /// escaped by a backslash.
    static func saveQuoted(_ s: String) -> String {
        var bare = !s.isEmpty, plain = true
        for b in s.utf8 {
            if !((b >= 0x30 && b <= 0x39) || (b >= 0x41 && b <= 0x5A) || (b >= 0x61 && b <= 0x7A) || b == 0x5F || b == 0x2D) { bare = false }
            if b == 0x22 || b == 0x5C || b == 0x27 { plain = false }
        }
        if bare { return s }
        if plain { return "\"" + s + "\"" }  // `namespace/name:port`: nothing to escape
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

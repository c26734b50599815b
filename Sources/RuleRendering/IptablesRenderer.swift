import NetAddress
import RulePlanning
import ServiceResolution

/// Renders one family of a plan as `iptables-restore` / `ip6tables-restore` input for the `nat` table.
/// The file declares only our chains, so `iptables-restore --noflush` leaves every other chain alone.
public enum IptablesRenderer {
    public struct Options: Sendable {
        /// Include `-A OUTPUT`/`-A POSTROUTING` jumps. The apply backend leaves them out and adds them only
        /// when missing, because iptables-restore cannot express "ensure" and would duplicate them.
        public var includeJumps: Bool
        public init(includeJumps: Bool = true) { self.includeJumps = includeJumps }
    }

    public static func render(_ plan: RulePlan, family: IPFamily, options: Options = Options()) -> String {
        let s = plan.settings
        let rules = plan.rules(family)
        let chains = plan.targetChains(family)
        let tool = family == .ipv4 ? "iptables" : "ip6tables"
        let hostBits = family == .ipv4 ? 32 : 128
        var out = ""
        out.reserveCapacity(256 + rules.count * 200)
        out += "# hostnet-dnat: \(rules.count) \(family.rawValue) mapping(s), target \(plan.strategy.rawValue).\n"
        out += "# Load with: \(tool)-restore --noflush -w < FILE (declares and flushes only the chains below).\n"
        if options.includeJumps {
            out += "# The OUTPUT/POSTROUTING jumps are appended on every load; to re-apply, use\n"
            out += "# `hostnet-dnat apply --backend iptables`, which adds them only when missing.\n"
        }
        out += "*nat\n"
        out += ":\(s.chain) - [0:0]\n"
        if s.masquerade { out += ":\(s.masqueradeChain) - [0:0]\n" }
        for chain in chains where !chain.isKubeProxyJump {
            out += ":\(chain.iptablesName) - [0:0]\n"
        }
        for r in rules {
            let m = r.mapping
            let chain = plan.targetChains[r.targetIndex]
            let proto = m.protocol.lowercased
            // With loadBalancerSourceRanges, one rule per block (kube-proxy's KUBE-FW chain matches `-s` the
            // same way); other sources match nothing here and are left alone.
            for range in m.sourceRanges.isEmpty ? [nil] : m.sourceRanges.map(Optional.some) {
                out += "-A \(s.chain)"
                if let range { out += " -s \(range)" }
                out += " -d \(m.externalIP)/\(hostBits) -p \(proto) -m \(proto) --dport \(m.port)"
                out += " -m comment --comment \"\(chain.comment)\" -j \(chain.jumpTarget)\n"
            }
        }
        for chain in chains where !chain.isKubeProxyJump {
            let destinations = chain.target.destinations
            let proto = chain.protocol.lowercased
            let head = "-A \(chain.iptablesName) -p \(proto) -m comment --comment \"\(chain.comment)\""
            // ClientIP affinity: kube-proxy's `recent` match, one list per destination. A client seen within
            // the timeout goes back to its destination; every translation (re)sets the client in its list.
            let affinity = chain.affinityTimeout
            if let seconds = affinity {
                for d in destinations {
                    let list = chain.affinityName(d)
                    out += "\(head) -m recent --name \(list) --rcheck --seconds \(seconds) --reap"
                    out += " -m recent --name \(list) --set -j DNAT --to-destination \(d)\n"
                }
            }
            for (i, d) in destinations.enumerated() {
                out += head
                let remaining = destinations.count - i
                if remaining > 1 {
                    out += " -m statistic --mode random --probability \(probability(1, remaining))"
                }
                if affinity != nil { out += " -m recent --name \(chain.affinityName(d)) --set" }
                out += " -j DNAT --to-destination \(d)\n"
            }
        }
        if s.masquerade {
            for ip in plan.externalAddresses(family) {
                out += "-A \(s.masqueradeChain) -m conntrack --ctstate DNAT --ctorigdst \(ip)/\(hostBits) -j MASQUERADE\n"
            }
        }
        if options.includeJumps {
            out += jumpLines(s).map { $0 + "\n" }.joined()
        }
        out += "COMMIT\n"
        return out
    }

    /// The rules that hook our chains into the built-in ones, as `-A`/`-I` lines for a restore file.
    /// `output`/`postrouting` false leave that jump out (the apply backend adds only the missing ones);
    /// the POSTROUTING jump is there only with masquerading on.
    public static func jumpLines(_ s: PlanSettings, output: Bool = true, postrouting: Bool = true) -> [String] {
        var lines: [String] = []
        if output { lines.append(s.runsBeforeKubeProxy ? "-I OUTPUT 1 -j \(s.chain)" : "-A OUTPUT -j \(s.chain)") }
        if postrouting && s.masquerade { lines.append("-A POSTROUTING -j \(s.masqueradeChain)") }
        return lines
    }

    /// kube-proxy's `%0.10f` formatting of 1/n, so our spreading reads exactly like theirs.
    static func probability(_ numerator: Int, _ denominator: Int) -> String {
        // Exact decimal rounding to 10 places without relying on printf.
        let scale = 10_000_000_000
        let scaled = (numerator * scale * 2 + denominator) / (2 * denominator)
        let whole = scaled / scale
        var frac = String(scaled % scale)
        frac = String(repeating: "0", count: 10 - frac.count) + frac
        return "\(whole).\(frac)"
    }
}

extension TargetChain {
    /// Where the dispatch rule jumps: our chain, or kube-proxy's `KUBE-SVC-…`.
    var jumpTarget: String {
        if case .kubeProxyChain(let name) = target { return name }
        return iptablesName
    }
}

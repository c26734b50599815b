import KubeObjects
import NetAddress
import RulePlanning
import ServiceResolution

/// Renders a plan as JSON for scripts and review (`jq`). Keys are written in a fixed order, so output is
/// byte-identical for identical plans.
public enum JSONRenderer {
    public static func render(_ plan: RulePlan) -> String {
        let w = JSONWriter()
        w.object {
            w.key("target"); w.string(plan.strategy.rawValue)
            w.key("table"); w.string(plan.settings.table)
            w.key("priority"); w.number(plan.settings.priority)
            w.key("masquerade"); w.bool(plan.settings.masquerade)
            w.key("mappings")
            w.array(plan.rules) { r in
                let m = r.mapping
                let chain = plan.targetChains[r.targetIndex]
                w.object {
                    w.key("service"); w.string(m.service.description)
                    w.key("port"); w.string(m.portName)
                    w.key("protocol"); w.string(m.protocol.rawValue)
                    w.key("family"); w.string(m.family.rawValue)
                    w.key("external")
                    w.object {
                        w.key("ip"); w.string(m.externalIP.description)
                        w.key("port"); w.number(m.port)
                    }
                    w.key("source"); w.string(m.source.rawValue)
                    if !m.sourceRanges.isEmpty {
                        w.key("sourceRanges"); w.array(m.sourceRanges) { w.string($0.description) }
                    }
                    if let t = chain.affinityTimeout {
                        w.key("sessionAffinity")
                        w.object {
                            w.key("clientIP"); w.bool(true)
                            w.key("timeoutSeconds"); w.number(t)
                        }
                    }
                    w.key("strategy"); w.string(m.target.strategy.rawValue)
                    w.key("targets")
                    w.array(m.target.destinations) { d in
                        w.object {
                            w.key("ip"); w.string(d.ip.description)
                            w.key("port"); w.number(d.port)
                        }
                    }
                    if case .kubeProxyChain(let name) = m.target {
                        w.key("chain"); w.string(name)
                    } else {
                        w.key("iptablesChain"); w.string(chain.iptablesName)
                    }
                }
            }
            w.key("skipped")
            w.array(plan.skipped) { s in
                w.object {
                    w.key("service"); w.string(s.service.description)
                    if let p = s.port { w.key("port"); w.string(p) }
                    if let a = s.address { w.key("address"); w.string(a) }
                    w.key("code"); w.string(s.code.rawValue)
                    w.key("reason"); w.string(s.reason)
                }
            }
            w.key("conflicts")
            w.array(plan.conflicts) { c in
                w.object {
                    w.key("external")
                    w.object {
                        w.key("ip"); w.string(c.externalIP.description)
                        w.key("port"); w.number(c.port)
                    }
                    w.key("protocol"); w.string(c.protocol.rawValue)
                    w.key("services"); w.array(c.services) { w.string($0) }
                }
            }
            w.key("warnings"); w.array(plan.warnings) { w.string($0.message) }
        }
        return w.output + "\n"
    }
}

/// A minimal pretty-printing JSON writer (two-space indent, like `jq .`). A class, so nested closures can
/// write into it.
public final class JSONWriter {
    public private(set) var output = ""
    private var depth = 0
    private var needsComma = [false]
    private var afterKey = false

    public init() {}

    private func beginValue() {
        if afterKey { afterKey = false; return }
        if needsComma[needsComma.count - 1] { output += "," }
        if depth > 0 { output += "\n" + String(repeating: "  ", count: depth) }
        needsComma[needsComma.count - 1] = true
    }

    public func key(_ k: String) {
        if needsComma[needsComma.count - 1] { output += "," }
        output += "\n" + String(repeating: "  ", count: depth)
        needsComma[needsComma.count - 1] = true
        JSONWriter.appendQuoted(k, to: &output)
        output += ": "
        afterKey = true
    }

    public func string(_ s: String) { beginValue(); JSONWriter.appendQuoted(s, to: &output) }
    public func number(_ n: Int) { beginValue(); output += String(n) }
    public func bool(_ b: Bool) { beginValue(); output += b ? "true" : "false" }

    public func object(_ body: () -> Void) {
        beginValue()
        output += "{"
        depth += 1; needsComma.append(false)
        body()
        let had = needsComma.removeLast(); depth -= 1
        if had { output += "\n" + String(repeating: "  ", count: depth) }
        output += "}"
    }

    public func array<C: Collection>(_ items: C, _ each: (C.Element) -> Void) {
        beginValue()
        output += "["
        depth += 1; needsComma.append(false)
        for item in items { each(item) }
        let had = needsComma.removeLast(); depth -= 1
        if had { output += "\n" + String(repeating: "  ", count: depth) }
        output += "]"
    }

    public static func appendQuoted(_ s: String, to out: inout String) {
        out += JSONValue.quoted(s)
    }
}

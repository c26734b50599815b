import NetAddress

/// A parsed `iptables-save` dump (or an `iptables-restore` file: the same grammar). Only what the backend
/// needs: tables, their chains in order, and each chain's rules as tokens.
struct SavedRuleset: Sendable {
    struct Rule: Sendable, Equatable {
        /// The line as written, without the leading `-A CHAIN `.
        var text: String
        /// Shell-like tokens of `text`, quotes removed.
        var tokens: [String]
        /// The `-j`/`-g` target, if any.
        var target: String? {
            for (i, t) in tokens.enumerated() where (t == "-j" || t == "-g" || t == "--jump" || t == "--goto") && i + 1 < tokens.count {
                return tokens[i + 1]
            }
            return nil
        }
    }

    struct Table: Sendable {
        var name: String
        /// Chains in the order the dump declares them (built-ins first).
        var chainOrder: [String] = []
        var rules: [String: [Rule]] = [:]
        /// Other lines a restore file may carry (`-X`, `-D`, `-I`…), kept for completeness.
        var commands: [String] = []

        func hasChain(_ name: String) -> Bool { rules[name] != nil }
        func rules(_ chain: String) -> [Rule] { rules[chain] ?? [] }

        /// chain -> the chains holding a rule that jumps to it.
        func referrers() -> [String: Set<String>] {
            var out: [String: Set<String>] = [:]
            for (chain, rs) in rules {
                for r in rs { if let t = r.target { out[t, default: []].insert(chain) } }
            }
            return out
        }
    }

    var tables: [String: Table] = [:]
    var tableOrder: [String] = []

    func table(_ name: String) -> Table? { tables[name] }

    static func parse(_ text: String) -> SavedRuleset {
        var result = SavedRuleset()
        var current: Table?
        func finish() {
            if let t = current {
                if result.tables[t.name] == nil { result.tableOrder.append(t.name) }
                result.tables[t.name] = t
            }
            current = nil
        }
        for raw in text.split(separator: "\n", omittingEmptySubsequences: true) {
            let line = raw.trimmingSuffixWhitespace()
            if line.isEmpty || line.hasPrefix("#") { continue }
            if line.hasPrefix("*") {
                finish()
                let name = String(line.dropFirst())
                current = result.tables[name] ?? Table(name: name)
                continue
            }
            if line == "COMMIT" { finish(); continue }
            guard current != nil else { continue }
            if line.hasPrefix(":") {
                let name = String(line.dropFirst().split(separator: " ", maxSplits: 1).first ?? "")
                if current!.rules[name] == nil { current!.chainOrder.append(name); current!.rules[name] = [] }
                continue
            }
            if line.hasPrefix("-A ") {
                let rest = line.dropFirst(3)
                let parts = rest.split(separator: " ", maxSplits: 1, omittingEmptySubsequences: true)
                guard let chain = parts.first.map(String.init) else { continue }
                let body = parts.count > 1 ? String(parts[1]) : ""
                if current!.rules[chain] == nil { current!.chainOrder.append(chain); current!.rules[chain] = [] }
                current!.rules[chain]!.append(Rule(text: body, tokens: tokenize(body)))
                continue
            }
            current!.commands.append(String(line))
        }
        finish()
        return result
    }

    /// Splits like iptables-restore does: whitespace separates, double quotes group, a backslash inside
    /// quotes escapes the next character.
    static func tokenize(_ s: String) -> [String] {
        var tokens: [String] = []
        var token = ""
        var inQuotes = false, escaped = false, haveToken = false
        for ch in s {
            if escaped { token.append(ch); escaped = false; continue }
            if inQuotes {
                if ch == "\\" { escaped = true } else if ch == "\"" { inQuotes = false } else { token.append(ch) }
                continue
            }
            if ch == "\"" { inQuotes = true; haveToken = true; continue }
            if ch == " " || ch == "\t" {
                if haveToken || !token.isEmpty { tokens.append(token); token = ""; haveToken = false }
                continue
            }
            token.append(ch)
        }
        if haveToken || !token.isEmpty { tokens.append(token) }
        return tokens
    }
}

/// Rewrites a rule into the one spelling both sides agree on, so that the text we feed iptables-restore
/// compares equal to what iptables-save prints back: host prefixes dropped (`/32`, `/128`; save prints
/// `--ctorigdst` without one), the statistic probability rounded (the kernel keeps it as a 31-bit fraction
/// and prints 11 decimals), `!` kept as its own token, and quoting made canonical.
enum RuleNormalizer {
    static func normalize(_ tokens: [String]) -> String {
        let tokens = tokens.contains("recent") ? canonicalRecent(tokens) : tokens
        var out: [String] = []
        out.reserveCapacity(tokens.count)
        var previous = ""
        for t in tokens {
            var token = t
            if previous == "--probability", let p = Double(t) {
                token = formatProbability(p)
            } else if !looksLikeAddress(t) {
                // Most tokens are flags and names: skip the address parser.
            } else if let slash = t.lastIndex(of: "/") {
                let suffix = t[t.index(after: slash)...]
                let address = t[..<slash]
                if let ip = IPAddress(address), (ip.family == .ipv4 && suffix == "32") || (ip.family == .ipv6 && suffix == "128") {
                    token = ip.description
                }
            } else if let ip = IPAddress(t) {
                token = ip.description
            }
            out.append(quote(token))
            previous = t
        }
        return out.joined(separator: " ")
    }

    /// `-m recent` options in one order, defaults dropped: we write kube-proxy's `--name X --rcheck --seconds T
    /// --reap`, iptables-save prints `--rcheck --seconds T --reap --name X --mask 255.255.255.255 --rsource`.
    static func canonicalRecent(_ tokens: [String]) -> [String] {
        let withValue: Set<String> = ["--name", "--seconds", "--hitcount", "--mask"]
        let order = ["--set", "--rcheck", "--update", "--remove", "--seconds", "--hitcount", "--reap", "--rttl", "--rdest", "--mask", "--name"]
        var out: [String] = []
        var i = 0
        while i < tokens.count {
            guard tokens[i] == "-m", i + 1 < tokens.count, tokens[i + 1] == "recent" else { out.append(tokens[i]); i += 1; continue }
            i += 2
            var options: [String: String] = [:]
            while i < tokens.count, tokens[i].hasPrefix("--") {
                let flag = tokens[i]
                if withValue.contains(flag), i + 1 < tokens.count { options[flag] = tokens[i + 1]; i += 2 } else { options[flag] = ""; i += 1 }
            }
            if options["--mask"] == "255.255.255.255" || options["--mask"] == "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff" { options["--mask"] = nil }
            options["--rsource"] = nil
            out += ["-m", "recent"]
            for flag in order { if let v = options[flag] { out.append(flag); if !v.isEmpty { out.append(v) } } }
        }
        return out
    }

    /// Starts like an address (hex digit or ':') and has '.' or ':' in it.
    private static func looksLikeAddress(_ t: String) -> Bool {
        guard let f = t.utf8.first else { return false }
        let hex = (f >= 0x30 && f <= 0x39) || (f >= 0x61 && f <= 0x66) || (f >= 0x41 && f <= 0x46) || f == 0x3a
        return hex && t.utf8.contains { $0 == 0x2e || $0 == 0x3a }
    }

    static func normalize(_ rule: SavedRuleset.Rule) -> String { normalize(rule.tokens) }

    /// Six decimals: far coarser than the kernel's 2^-31 steps, far finer than any 1/N we write.
    static func formatProbability(_ p: Double) -> String {
        let scaled = Int((p * 1_000_000).rounded())
        let whole = scaled / 1_000_000
        let frac = String(scaled % 1_000_000)
        return "\(whole)." + String(repeating: "0", count: 6 - frac.count) + frac
    }

    static func quote(_ s: String) -> String {
        if !s.isEmpty && !s.contains(where: { $0 == " " || $0 == "\"" || $0 == "\\" || $0 == "\t" }) { return s }
        var q = "\""
        for ch in s {
            if ch == "\"" || ch == "\\" { q.append("\\") }
            q.append(ch)
        }
        return q + "\""
    }
}

extension Substring {
    func trimmingSuffixWhitespace() -> Substring {
        var s = self
        while let last = s.last, last == " " || last == "\t" || last == "\r" { s = s.dropLast() }
        return s
    }
}

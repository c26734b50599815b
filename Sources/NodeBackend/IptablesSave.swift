import NetAddress

/// A parsed `iptables-save` dump (or an `iptables-restore` file: the same grammar). Only what the backend
/// needs: tables, their chains in order, and each chain's rules as tokens.
struct SavedRuleset: Sendable {
    struct Rule: Sendable, Equatable {
        /// The line as written, without the leading `-A CHAIN `.
        var text: String
        /// The `-j`/`-g` target, if any: found once when the rule is read (every dump is scanned for who
        /// jumps where), without splitting the whole line into tokens.
        var target: String?

        init(text: String) {
            self.text = text
            target = SavedRuleset.jumpTarget(text)
        }

        /// Shell-like tokens of `text`, quotes removed. Computed on demand: most rules of a big dump are
        /// only compared as text.
        var tokens: [String] { SavedRuleset.tokenize(text) }

        static func == (a: Rule, b: Rule) -> Bool { a.text == b.text }
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

    /// Reads the dump line by line on its UTF-8 bytes. A chain's rules are consecutive in a dump, so they are
    /// collected in one array and stored once per run of lines, not looked up per rule.
    static func parse(_ text: String) -> SavedRuleset {
        var result = SavedRuleset()
        var current: Table?
        var runChain = ""
        var run: [Rule] = []
        func flushRun() {
            guard !run.isEmpty, current != nil else { run = []; return }
            if current!.rules[runChain] == nil { current!.chainOrder.append(runChain); current!.rules[runChain] = run }
            else { current!.rules[runChain]!.append(contentsOf: run) }
            run = []
        }
        func finish() {
            flushRun()
            if let t = current {
                if result.tables[t.name] == nil { result.tableOrder.append(t.name) }
                result.tables[t.name] = t
            }
            current = nil
        }
        let space: UInt8 = 0x20
        for raw in text.utf8.split(separator: 0x0A, omittingEmptySubsequences: true) {
            var bytes = raw[...]
            while let last = bytes.last, last == space || last == 0x09 || last == 0x0D { bytes = bytes.dropLast() }
            guard let first = bytes.first, first != UInt8(ascii: "#") else { continue }
            let line = Substring(bytes)
            if first == UInt8(ascii: "*") {
                finish()
                let name = String(line.dropFirst())
                current = result.tables[name] ?? Table(name: name)
                continue
            }
            if line == "COMMIT" { finish(); continue }
            guard current != nil else { continue }
            if first == UInt8(ascii: ":") {
                flushRun()
                let name = String(line.dropFirst().split(separator: " ", maxSplits: 1).first ?? "")
                if current!.rules[name] == nil { current!.chainOrder.append(name); current!.rules[name] = [] }
                continue
            }
            if line.hasPrefix("-A ") {
                let rest = bytes.dropFirst(3).drop { $0 == space }
                let nameEnd = rest.firstIndex(of: space) ?? rest.endIndex
                let name = rest[..<nameEnd]
                guard !name.isEmpty else { continue }
                if !name.elementsEqual(runChain.utf8) { flushRun(); runChain = String(Substring(name)) }
                let body = rest[nameEnd...].drop { $0 == space }
                run.append(Rule(text: String(Substring(body))))
                continue
            }
            flushRun()
            current!.commands.append(String(line))
        }
        finish()
        return result
    }

    /// The word after the first `-j`/`-g`/`--jump`/`--goto` outside quotes, as `tokenize` would find it.
    static func jumpTarget(_ s: String) -> String? {
        var wantNext = false
        var found: String?
        forEachToken(s) { token in
            if wantNext { found = token; return false }
            if token == "-j" || token == "-g" || token == "--jump" || token == "--goto" { wantNext = true }
            return true
        }
        return found
    }

    /// Splits like iptables-restore does: whitespace separates, double quotes group, a backslash inside
    /// quotes escapes the next character.
    static func tokenize(_ s: String) -> [String] {
        var tokens: [String] = []
        forEachToken(s) { tokens.append($0); return true }
        return tokens
    }

    /// The tokenizer on UTF-8 bytes; `body` returns false to stop. A token without quotes is a slice of the
    /// line (no per-character work); only quoted tokens are copied byte by byte.
    private static func forEachToken(_ s: String, _ body: (String) -> Bool) {
        let u = s.utf8
        var i = u.startIndex
        while i < u.endIndex {
            let c = u[i]
            if c == 0x20 || c == 0x09 { i = u.index(after: i); continue }
            let start = i
            var plain = true
            var bytes: [UInt8] = []
            var inQuotes = false
            while i < u.endIndex {
                let b = u[i]
                if inQuotes {
                    if b == 0x5C {  // backslash
                        i = u.index(after: i)
                        if i < u.endIndex { bytes.append(u[i]) }
                    } else if b == 0x22 {
                        inQuotes = false
                    } else {
                        bytes.append(b)
                    }
                } else if b == 0x20 || b == 0x09 {
                    break
                } else if b == 0x22 {
                    if plain { bytes.append(contentsOf: u[start..<i]); plain = false }
                    inQuotes = true
                } else if !plain {
                    bytes.append(b)
                }
                if i < u.endIndex { i = u.index(after: i) }
            }
            let token = plain ? String(Substring(u[start..<i])) : String(decoding: bytes, as: UTF8.self)
            if !body(token) { return }
        }
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

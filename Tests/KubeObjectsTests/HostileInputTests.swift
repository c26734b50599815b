#if canImport(Glibc)
import Glibc
#endif
import KubeObjects
import Testing

/// Inputs built to cost memory or time out of proportion to their size, or to be mistaken for data.
@Suite struct HostileInputTests {
    /// Nine levels of nine aliases: 9^9 (387 million) leaves from about 500 bytes. Before the budget this
    /// took ~30 s and 4 GB, then crashed.
    static func aliasBomb(levels: Int = 9, width: Int = 9, asKey: Bool = false) -> String {
        var lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
        for level in 1..<levels {
            let refs = Array(repeating: "*a\(level - 1)", count: width).joined(separator: ", ")
            lines.append("a\(level): &a\(level) [\(refs)]")
        }
        // Yams hashes mapping keys to find duplicates; an aliased key is hashed in full.
        lines.append(asKey ? "? *a\(levels - 1)\n: boom" : "boom: *a\(levels - 1)")
        return lines.joined(separator: "\n") + "\n"
    }

    @Test(arguments: [false, true])
    func aliasExpansionIsRefusedWithOneLineNamingTheFile(asKey: Bool) throws {
        do {
            _ = try DocumentLoader.load(Array(Self.aliasBomb(asKey: asKey).utf8), source: "bomb.yaml")
            Issue.record("an alias bomb was accepted")
        } catch {
            #expect(error.description.hasPrefix("bomb.yaml: YAML aliases expand to more than"))
            #expect(!error.description.contains("\n"))
        }
    }

    @Test func ordinaryAnchorsStillWork() throws {
        let objects = try DocumentLoader.load(Array("""
        apiVersion: v1
        kind: Service
        metadata: {name: a, namespace: n, labels: &l {app: web, tier: front}}
        spec:
          externalIPs: [192.0.2.1]
          ports: &p
          - port: 443
        ---
        apiVersion: v1
        kind: Service
        metadata: {name: b, namespace: n, labels: *l}
        spec:
          ports: *p
        """.utf8), source: "anchors.yaml")
        #expect(objects.services.map(\.labels) == [["app": "web", "tier": "front"], ["app": "web", "tier": "front"]])
        #expect(objects.services[1].ports.map(\.port) == [443])
    }

    @Test func budgetCountsWhatAliasesAdd() throws {
        // Just inside and just outside: 4 × written + allowance.
        #expect(throws: Never.self) { try YAMLBudget.check(Array(Self.aliasBomb(levels: 4, width: 9).utf8)) }
        #expect(throws: YAMLBudget.Violation.self) { try YAMLBudget.check(Array(Self.aliasBomb(levels: 7, width: 9).utf8)) }
    }

    @Test(arguments: [600, 100_000])
    func deepNestingIsRefusedNotAStackOverflow(depth: Int) throws {
        let deep = "a: " + String(repeating: "[", count: depth) + String(repeating: "]", count: depth) + "\n"
        do {
            _ = try DocumentLoader.load(Array(deep.utf8), source: "deep.yaml")
            Issue.record("accepted")
        } catch {
            // libyaml's own limit (1000) may speak first; either way one line, no crash.
            #expect(error.description == "deep.yaml: YAML nested deeper than 512 levels (line 1)"
                    || error.description.hasPrefix("deep.yaml: malformed YAML: "), "\(error)")
            #expect(!error.description.contains("\n"))
        }
        let block = (0..<600).map { String(repeating: " ", count: $0) + "- " }.joined(separator: "\n") + "x\n"
        #expect(throws: YAMLBudget.Violation.tooDeep(limit: 512, line: 513)) { try YAMLBudget.check(Array(block.utf8)) }
    }

    @Test(arguments: ["", " \n\t\r\n", "# only a comment\n", "---\n---\n", "\u{FEFF}", "\u{FEFF}\n\n# c\n  # d\n"])
    func noDocumentAtAllIsAnError(text: String) {
        do {
            _ = try DocumentLoader.load(Array(text.utf8), source: "cluster.json")
            Issue.record("\(text.debugDescription) was read as an empty cluster")
        } catch {
            #expect(error.description.hasPrefix("cluster.json: holds no Kubernetes object"))
        }
    }

    @Test func anEmptyListSaysSoAndAFullOneDoesNot() throws {
        for text in [#"{"kind":"List","apiVersion":"v1","items":[]}"#, #"{"kind":"ServiceList","items":null}"#,
                     "kind: List\nitems: []\n", "{kind: ServiceList, apiVersion: v1, items: []}"] {
            let o = try DocumentLoader.load(Array(text.utf8), source: "x")
            #expect(o.sawEmptyList && o.declaresNoServices && o.documents == 1, "\(text)")
        }
        let full = #"{"kind":"List","items":[{"kind":"ConfigMap","apiVersion":"v1","metadata":{"name":"c"}}]}"#
        let o = try DocumentLoader.load(Array(full.utf8), source: "x")
        #expect(!o.sawEmptyList && !o.declaresNoServices && o.documents == 1)
        let typed = #"{"kind":"ServiceList","items":[{"metadata":{"name":"a","namespace":"n"},"spec":{"ports":[{"port":1}]}}]}"#
        #expect(!(try DocumentLoader.load(Array(typed.utf8), source: "x")).sawEmptyList)
    }

    @Test func flowStyleYAMLIsYAMLNotBrokenJSON() throws {
        let o = try DocumentLoader.load(Array("{apiVersion: v1, kind: Service, metadata: {name: a, namespace: n}, spec: {ports: [{port: 80}]}}".utf8), source: "x")
        #expect(o.services.map(\.id.description) == ["n/a"])
        // Broken JSON still reads as JSON, with a JSON message.
        do {
            _ = try DocumentLoader.load(Array(#"{"kind": "List", "items": [}"#.utf8), source: "x")
            Issue.record("accepted")
        } catch {
            #expect(error.description.hasPrefix("x: malformed JSON at line 1"))
        }
    }

    /// Found by `scripts/fuzz objects`: a YAML 1.1 base-60 integer too long for Int made Yams trap
    /// (`render -f` crashed with SIGILL). Base-60 numbers are strings, as sigs.k8s.io/yaml reads them.
    @Test(arguments: ["1111111111111112222:8", "1:30", "-90:00:00", "190:20:30.15"])
    func baseSixtyNumbersAreStringsAndNeverTrap(value: String) throws {
        #expect(throws: InputError.self) { try DocumentLoader.load(Array("\(value)\n".utf8), source: "in.yaml") }
        let service = "kind: Service\nmetadata: {name: a, namespace: n, labels: {v: \(value)}}\nspec: {ports: [{port: 80}]}\n"
        let o = try DocumentLoader.load(Array(service.utf8), source: "in.yaml")
        #expect(o.services.first?.labels["v"] == value)
    }

    @Test func inputReaderStopsAtTheLimit() throws {
        var fds: [Int32] = [0, 0]
        #expect(pipe(&fds) == 0)
        let payload = [UInt8](repeating: 0x20, count: 5000)
        #expect(payload.withUnsafeBytes { write(fds[1], $0.baseAddress, $0.count) } == 5000)
        close(fds[1])
        defer { close(fds[0]) }
        #expect(throws: InputReadError.tooLarge(name: "p", limit: 4999)) { try InputReader.readAll(fd: fds[0], name: "p", limit: 4999) }
        #expect(InputReadError.tooLarge(name: "p", limit: 4999).description == "p: larger than the input limit of 4999 bytes; raise it with --max-input-bytes")
        #expect(InputReader.describe(bytes: 1 << 30) == "1 GiB")
    }

    /// A regular file over 64 KB is sized first and read into uninitialized memory: all of it, exactly as
    /// written, also when it is exactly the limit; refused when over the limit.
    @Test func inputReaderReadsASizedFileWhole() throws {
        let path = "/tmp/hnd-input-\(getpid()).bin"
        defer { unlink(path) }
        let payload = (0..<200_000).map { UInt8(truncatingIfNeeded: $0 &* 31) }
        let w = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        #expect(w >= 0)
        #expect(payload.withUnsafeBytes { write(w, $0.baseAddress, $0.count) } == payload.count)
        close(w)
        func read(limit: Int) throws -> [UInt8] {
            let fd = open(path, O_RDONLY)
            #expect(fd >= 0)
            defer { close(fd) }
            return try InputReader.readAll(fd: fd, name: "f", limit: limit)
        }
        #expect(try read(limit: 1 << 20) == payload)
        #expect(try read(limit: payload.count) == payload)
        #expect(throws: InputReadError.tooLarge(name: "f", limit: payload.count - 1)) { try read(limit: payload.count - 1) }
    }

    @Test func aJSONSyntaxErrorNamesTheByteAndNeverEchoesIt() {
        for (bytes, shown) in [([UInt8](#"{"a": "#.utf8) + [0x1B, 0x5B, 0x33, 0x31, 0x6D, 0x7D], "unexpected byte 0x1B"),
                               ([UInt8](#"{"a": "#.utf8) + [0xC3, 0xA9], "unexpected byte 0xC3"),
                               (Array(#"{"a": x}"#.utf8), "unexpected character 'x'")] {
            do {
                _ = try JSONParser.parse(bytes)
                Issue.record("accepted")
            } catch {
                #expect(error.message == shown)
            }
        }
    }
}

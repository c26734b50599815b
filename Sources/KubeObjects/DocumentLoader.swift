import Yams

/// Reads what `kubectl get … -o json|yaml` prints (and what the API server returns) into `ClusterObjects`.
public enum DocumentLoader {
    /// Decodes one file's bytes. JSON is recognised by its first character and parsed by the fast JSON
    /// parser; anything else is read as (possibly multi-document) YAML.
    public static func load(_ bytes: [UInt8], source: String) throws(InputError) -> ClusterObjects {
        var result = ClusterObjects()
        try load(bytes, source: source, into: &result)
        return result
    }

    /// An input with no document at all (zero bytes, only whitespace or comments, only empty YAML
    /// documents) is an error, not "no Services": kubectl never prints it, and reading it as an empty
    /// cluster would remove every rule.
    public static func load(_ bytes: [UInt8], source: String, into result: inout ClusterObjects) throws(InputError) {
        var loaded = ClusterObjects()
        try loadDocuments(bytes, source: source, into: &loaded)
        guard loaded.documents > 0 else { throw InputError(source: source, message: emptyInputMessage) }
        result.merge(loaded)
    }

    static let emptyInputMessage = "holds no Kubernetes object (it is empty or only whitespace and comments); "
        + "an empty cluster is a List with no items (kind: List, items: [])"

    private static func loadDocuments(_ bytes: [UInt8], source: String, into result: inout ClusterObjects) throws(InputError) {
        var start = 0
        if bytes.count >= 3 && bytes[0] == 0xEF && bytes[1] == 0xBB && bytes[2] == 0xBF { start = 3 }  // UTF-8 BOM
        while start < bytes.count, [0x20, 0x09, 0x0A, 0x0D].contains(bytes[start]) { start += 1 }
        if start == bytes.count { return }
        if isJSON(bytes, at: start) {
            var decoded = result
            let (document, streamed, _) = try parseJSON(bytes, from: start, source: source, into: &decoded)
            result = decoded
            try ObjectDecoder.decode(document: document, source: source, into: &result)
            // Streamed items leave the List's `items` empty by the time it is decoded: it was not an empty list.
            if streamed > 0 { result.sawEmptyList = decoded.sawEmptyList }
            result.documents += 1
            return
        }
        guard let text = String(validating: bytes, as: UTF8.self) else {
            throw InputError(source: source, message: "not UTF-8 text")
        }
        do throws(YAMLBudget.Violation) {
            try YAMLBudget.check(bytes)
        } catch {
            throw InputError(source: source, message: error.description)
        }
        let documents: [JSONValue]
        do {
            // compose_all is lazy and keeps a parse error in the sequence instead of throwing it.
            var sequence = try Yams.compose_all(yaml: text)
            var nodes: [JSONValue] = []
            while let node = sequence.next() { nodes.append(try jsonValue(from: node)) }
            if let error = sequence.error { throw error }
            documents = nodes
        } catch let e as InputError {
            throw InputError(source: source, message: e.message)
        } catch let e as YamlError {
            throw InputError(source: source, message: "malformed YAML: \(yamlMessage(e))")
        } catch {
            throw InputError(source: source, message: "malformed YAML: \(error)")
        }
        for doc in documents where doc != .null {
            try ObjectDecoder.decode(document: doc, source: source, into: &result)
            result.documents += 1
        }
    }

    /// From this size on, a List's items are parsed and decoded by two threads (one per half): reading an
    /// 87 MB dump of 10k Services is most of what `render` and `apply` spend before the kernel sees anything.
    static let twoThreadMinimumBytes = 8 << 20

    /// One JSON document. Items that name their kind are decoded while the List is parsed and never kept;
    /// items of typed lists (no kind of their own) wait until the list's kind is known. Returns the document
    /// without those items, how many items were streamed, and how many of them the second thread parsed (tests
    /// check that the two-thread path really ran; `awaitSplit` makes it run whatever the timing).
    static func parseJSON(_ bytes: [UInt8], from start: Int, source: String, into decoded: inout ClusterObjects,
                          twoThreadsFrom minimum: Int = twoThreadMinimumBytes,
                          splitFraction: Double = 0.5, awaitSplit: Bool = false) throws(InputError) -> (document: JSONValue, streamed: Int, secondThread: Int) {
        var decodeError: InputError? = nil
        var index = 0
        var secondThread = 0
        var objects = decoded
        let sink = { (item: JSONValue) -> JSONParser.ItemDisposition in
            defer { index += 1 }
            return streamItem(item, index: index, source: source, into: &objects, error: &decodeError)
        }
        let document: JSONValue?
        do throws(JSONSyntaxError) {
            if bytes.count - start >= minimum {
                document = try bytes.withUnsafeBufferPointer { (buffer) throws(JSONSyntaxError) -> JSONValue? in
                    // The second thread looks for the split itself (a scan of half the file), then parses from
                    // there; this one starts parsing at once.
                    let tail = ItemsTailJob(buffer: buffer, from: start, near: start + Int(Double(bytes.count - start) * splitFraction),
                                            source: source)
                    guard tail.start() else { return try JSONParser.parse(bytes, from: start, topLevelItems: sink) }
                    defer { tail.cancelAndJoin() }  // the tail reads `buffer`: it never outlives this call
                    if awaitSplit { tail.waitUntilDecided() }
                    let handOver = JSONParser.HandOver(startsHere: tail.startsHere) { () throws(JSONSyntaxError) -> (kept: [JSONValue], end: Int)? in
                        switch tail.join() {
                        case .parsed(let kept, let end, let tailObjects, let count):
                            objects.merge(tailObjects)
                            index += count
                            secondThread = count
                            return (kept, end)
                        case .decodeFailed(let e):
                            decodeError = e
                            return nil
                        case .syntaxError(let e):
                            throw e
                        case .noSplit:
                            preconditionFailure("the tail said where it starts, so it has parsed from there")
                        }
                    }
                    return try JSONParser.parse(bytes, from: start, topLevelItems: sink, handOver: handOver)
                }
            } else {
                document = try JSONParser.parse(bytes, from: start, topLevelItems: sink)
            }
        } catch {
            throw InputError(source: source, message: "malformed JSON at line \(error.line), column \(error.column): \(error.message)")
        }
        if let decodeError { throw decodeError }
        decoded = objects
        return (document!, index, secondThread)
    }

    /// One streamed item: decoded into `objects` when it names its kind, else kept for the document.
    static func streamItem(_ item: JSONValue, index: Int, source: String, into objects: inout ClusterObjects,
                           error: inout InputError?) -> JSONParser.ItemDisposition {
        guard case .string? = item["kind"] else { return .keep }
        do throws(InputError) {
            try ObjectDecoder.decodeItem(item, defaultKind: nil, source: source, locator: "items[\(index)]", into: &objects)
            return .consumed
        } catch let e {
            error = e
            return .stop
        }
    }

    /// JSON starts with `{` or `[` and its first key or value is a quoted string (or nothing): `{"kind"…`,
    /// `[{"…`, `{}`. Flow-style YAML starts the same way but with a plain word: `{kind: List, items: []}`.
    /// Deciding on the first token keeps a broken JSON file reported as JSON.
    static func isJSON(_ bytes: [UInt8], at start: Int) -> Bool {
        guard bytes[start] == UInt8(ascii: "{") || bytes[start] == UInt8(ascii: "[") else { return false }
        var i = start
        while i < bytes.count, [0x20, 0x09, 0x0A, 0x0D, UInt8(ascii: "{"), UInt8(ascii: "[")].contains(bytes[i]) { i += 1 }
        guard i < bytes.count else { return true }
        return [UInt8(ascii: "\""), UInt8(ascii: "}"), UInt8(ascii: "]")].contains(bytes[i])
    }

    /// One line from Yams' multi-line error text (the snippet it appends is noise in a CLI message).
    static func yamlMessage(_ e: YamlError) -> String {
        let text = "\(e)"
        return text.split(separator: "\n").first.map(String.init) ?? text
    }

    /// Converts a YAML node the way sigs.k8s.io/yaml does: scalars by their resolved tag, timestamps as
    /// strings, mapping keys as strings.
    static func jsonValue(from node: Node) throws -> JSONValue {
        switch node {
        case .scalar(let s):
            let tag = Tag.Name(rawValue: node.tag.rawValue)
            if (tag == .int || tag == .float) && s.string.contains(":") {
                // YAML 1.1's base-60 numbers (`1:30`) are strings to Kubernetes (sigs.k8s.io/yaml reads
                // them so), and Yams' conversion of a long one traps on overflow (found by fuzzing).
                return .string(s.string)
            }
            switch tag {
            case .null: return .null
            case .bool: return node.bool.map(JSONValue.bool) ?? .string(s.string)
            case .int:
                if let i = node.int { return .int(i) }
                return node.float.map(JSONValue.double) ?? .string(s.string)
            case .float: return node.float.map(JSONValue.double) ?? .string(s.string)
            default: return .string(s.string)
            }
        case .sequence(let seq):
            return .array(try seq.map { try jsonValue(from: $0) })
        case .mapping(let map):
            var dict = JSONObject()
            for (k, v) in map {
                guard case .scalar(let ks) = k else {
                    throw InputError(source: "", message: "a mapping key is not a plain value (line \((k.mark?.line).map(String.init) ?? "?"))")
                }
                if ks.string == "<<" { continue }  // merge keys are not used by Kubernetes objects
                dict.append(ks.string, try jsonValue(from: v))
            }
            return .object(dict)
        case .alias:
            throw InputError(source: "", message: "YAML aliases are not supported in Kubernetes objects")
        }
    }
}

/// A parsed JSON (or YAML) document. Kubernetes objects are decoded from this tree by hand, so that
/// every error can name the object and the field path, and unknown fields are simply never read.
public enum JSONValue: Sendable, Equatable {
    case null
    case bool(Bool)
    case int(Int)
    case double(Double)
    case string(String)
    case array([JSONValue])
    case object(JSONObject)

    public subscript(key: String) -> JSONValue? {
        if case .object(let o) = self { return o[key] }
        return nil
    }

    public static func object(_ dict: [String: JSONValue]) -> JSONValue {
        var o = JSONObject()
        for k in dict.keys.sorted() { o.append(k, dict[k]!) }
        return .object(o)
    }

    /// `s` as a JSON string literal, quotes included: the one JSON string escaper every writer here uses.
    public static func quoted(_ s: String) -> String {
        var out = "\""
        out.reserveCapacity(s.utf8.count + 2)
        for u in s.unicodeScalars {
            switch u {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            // Line and paragraph separators: valid JSON, but they break a line-oriented reader or an
            // embedding in JavaScript.
            case "\u{2028}": out += "\\u2028"
            case "\u{2029}": out += "\\u2029"
            default:
                if u.value < 0x20 || u.value == 0x7F {
                    let hex = String(u.value, radix: 16)
                    out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
                } else {
                    out.unicodeScalars.append(u)
                }
            }
        }
        return out + "\""
    }

    /// A short name for error messages ("a string", "an object").
    public var kindDescription: String {
        switch self {
        case .null: return "null"
        case .bool: return "a boolean"
        case .int, .double: return "a number"
        case .string: return "a string"
        case .array: return "a list"
        case .object: return "an object"
        }
    }
}

/// A JSON object's members in document order. Kubernetes objects have few keys per level, so a linear
/// scan beats building a hash table for each of the hundreds of thousands of small objects in a dump.
public struct JSONObject: Sendable, Equatable, Sequence {
    public private(set) var keys: [String] = []
    public private(set) var values: [JSONValue] = []

    public init() {}

    /// The last member with this key (JSON's usual rule for duplicates).
    public subscript(key: String) -> JSONValue? {
        var i = keys.count - 1
        while i >= 0 {
            if keys[i] == key { return values[i] }
            i -= 1
        }
        return nil
    }

    public mutating func append(_ key: String, _ value: JSONValue) {
        keys.append(key)
        values.append(value)
    }

    public func makeIterator() -> Zip2Sequence<[String], [JSONValue]>.Iterator { zip(keys, values).makeIterator() }
}

/// A syntax error in a JSON document, with a 1-based line and column.
public struct JSONSyntaxError: Error, Sendable, Equatable {
    public let line: Int
    public let column: Int
    public let message: String
}

/// A small strict JSON parser over UTF-8 bytes. Hand-written because Foundation's parser gives no
/// position on error and a second conversion pass; this one builds `JSONValue` directly.
public struct JSONParser {
    private let bytes: UnsafeBufferPointer<UInt8>
    private var pos = 0
    private var depth = 0
    private var itemSink: ((JSONValue) -> ItemDisposition)? = nil
    private var handOver: HandOver? = nil
    private var stopped = false

    /// The rest of the top-level `items` list, parsed by someone else (a second thread) from an item's first
    /// byte that `itemsSplit` found. At each item's first byte this parser asks `startsHere`; on yes it calls
    /// `take`, which returns the tail's kept items and the position just past the list's `]`, or nil when the
    /// tail's sink said `.stop`; a syntax error in the tail is thrown as if this parser had met it.
    public struct HandOver {
        public let startsHere: (Int) -> Bool
        public let take: () throws(JSONSyntaxError) -> (kept: [JSONValue], end: Int)?
        public init(startsHere: @escaping (Int) -> Bool,
                    take: @escaping () throws(JSONSyntaxError) -> (kept: [JSONValue], end: Int)?) {
            self.startsHere = startsHere; self.take = take
        }
    }

    /// What `parse(_:from:topLevelItems:)` does with each element of the top-level `items` list.
    public enum ItemDisposition {
        /// The caller used it; it is not kept in the tree.
        case consumed
        /// Keep it in the returned document.
        case keep
        /// Stop parsing (the caller hit an error of its own).
        case stop
    }

    /// Parses `bytes[start...]` in place (no copy of a file that may be hundreds of megabytes).
    public static func parse(_ bytes: [UInt8], from start: Int = 0) throws(JSONSyntaxError) -> JSONValue {
        try parse(bytes, from: start, topLevelItems: nil)!
    }

    /// Like `parse`, but hands each element of a top-level object's `items` list to `sink` as soon as it is
    /// parsed, so a 100,000-object List never exists as one tree. Returns nil when `sink` said `.stop`.
    public static func parse(_ bytes: [UInt8], from start: Int = 0,
                             topLevelItems sink: ((JSONValue) -> ItemDisposition)?,
                             handOver: HandOver? = nil) throws(JSONSyntaxError) -> JSONValue? {
        let run = { (sink: ((JSONValue) -> ItemDisposition)?) -> Result<JSONValue?, JSONSyntaxError> in
            bytes.withUnsafeBufferPointer { buffer in
                var p = JSONParser(bytes: buffer)
                p.pos = start
                p.itemSink = sink
                p.handOver = sink == nil ? nil : handOver
                do throws(JSONSyntaxError) {
                    p.skipWhitespace()
                    let v = try p.parseValue()
                    if p.stopped { return .success(nil) }
                    p.skipWhitespace()
                    if p.pos != p.bytes.count { throw p.error("unexpected text after the end of the document") }
                    return .success(v)
                } catch {
                    return p.stopped ? .success(nil) : .failure(error)
                }
            }
        }
        guard let sink else { return try run(nil).get() }
        return try withoutActuallyEscaping(sink) { escapable in run(escapable) }.get()
    }

    /// The second half of a split `items` list: parses items from `offset` (an item's first byte, from
    /// `itemsSplit`) to the list's closing `]`, nested as deep as the list's items are, handing each to `sink`.
    /// Returns the kept items and the position just past the `]`, or nil when `sink` said `.stop`.
    public static func parseItemsTail(_ bytes: UnsafeBufferPointer<UInt8>, from offset: Int,
                                      sink: (JSONValue) -> ItemDisposition) throws(JSONSyntaxError) -> (kept: [JSONValue], end: Int)? {
        try withoutActuallyEscaping(sink) { (escapable) throws(JSONSyntaxError) -> (kept: [JSONValue], end: Int)? in
            var p = JSONParser(bytes: bytes)
            p.pos = offset
            p.depth = 2  // the top-level object, then its `items` list
            p.itemSink = escapable
            var kept: [JSONValue] = []
            do throws(JSONSyntaxError) {
                guard try p.continueItems(into: &kept) else { return nil }
            } catch {
                if p.stopped { return nil }
                throw error
            }
            return (kept, p.pos)
        }
    }

    /// Where a second parser can take over the `items` list of a top-level object: the first byte of the
    /// first item that starts at or after `target`, and that item's index in the list. A structural scan
    /// (strings skipped, brackets counted), several times faster than parsing. nil when the document is not
    /// an object with such a list, the list ends before `target`, or the bytes are not what they should be
    /// (the parser then does all the work, and finds any error itself).
    public static func itemsSplit(_ bytes: UnsafeBufferPointer<UInt8>, from start: Int, near target: Int) -> (offset: Int, index: Int)? {
        let n = bytes.count
        var i = start, depth = 0
        var inItems = false, index = 0
        func nextNonSpace(_ k: Int) -> Int {
            var k = k
            while k < n, bytes[k] == 0x20 || bytes[k] == 0x0A || bytes[k] == 0x0D || bytes[k] == 0x09 { k += 1 }
            return k
        }
        while i < n {
            let b = bytes[i]
            switch b {
            case UInt8(ascii: "\""):
                let first = i + 1
                var escaped = false
                i = first
                while i < n {
                    let c = bytes[i]
                    if c == UInt8(ascii: "\\") { escaped = true; i += 2; continue }
                    if c == UInt8(ascii: "\"") { break }
                    i += 1
                }
                guard i < n else { return nil }
                // A top-level key written with escapes may decode to `items` (the parser streams that list
                // too, and counts its items): the second thread could not tell where its indices start.
                if depth == 1, !inItems, escaped { return nil }
                if depth == 1, !inItems, i - first == 5, bytes[first] == UInt8(ascii: "i"), bytes[first + 1] == UInt8(ascii: "t"),
                   bytes[first + 2] == UInt8(ascii: "e"), bytes[first + 3] == UInt8(ascii: "m"), bytes[first + 4] == UInt8(ascii: "s") {
                    let colon = nextNonSpace(i + 1)
                    if colon < n, bytes[colon] == UInt8(ascii: ":") {
                        let open = nextNonSpace(colon + 1)
                        if open < n, bytes[open] == UInt8(ascii: "[") {
                            inItems = true
                            depth = 2
                            i = open + 1
                            continue
                        }
                    }
                }
                i += 1
            case UInt8(ascii: "{"), UInt8(ascii: "["):
                depth += 1; i += 1
            case UInt8(ascii: "}"), UInt8(ascii: "]"):
                depth -= 1
                if inItems && depth < 2 { return nil }   // the list ended first
                if depth < 1 { return nil }
                i += 1
            case UInt8(ascii: ","):
                i += 1
                if inItems && depth == 2 {
                    index += 1
                    let next = nextNonSpace(i)
                    if next >= target { return next < n ? (next, index) : nil }
                }
            default:
                i += 1
            }
        }
        return nil
    }

    private init(bytes: UnsafeBufferPointer<UInt8>) { self.bytes = bytes }

    private func error(_ message: String) -> JSONSyntaxError {
        var line = 1, col = 1
        var i = 0
        let end = min(pos, bytes.count)
        while i < end {
            if bytes[i] == 10 { line += 1; col = 1 } else if bytes[i] & 0xC0 != 0x80 { col += 1 }
            i += 1
        }
        return JSONSyntaxError(line: line, column: col, message: message)
    }

    private mutating func skipWhitespace() {
        while pos < bytes.count {
            switch bytes[pos] {
            case 0x20, 0x0A, 0x0D, 0x09: pos += 1
            default: return
            }
        }
    }

    private mutating func parseValue() throws(JSONSyntaxError) -> JSONValue {
        guard pos < bytes.count else { throw error("unexpected end of the document") }
        switch bytes[pos] {
        case UInt8(ascii: "{"): return try parseObject()
        case UInt8(ascii: "["): return try parseArray()
        case UInt8(ascii: "\""): return .string(try parseString())
        case UInt8(ascii: "t"): try expectWord("true"); return .bool(true)
        case UInt8(ascii: "f"): try expectWord("false"); return .bool(false)
        case UInt8(ascii: "n"): try expectWord("null"); return .null
        case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"): return try parseNumber()
        default:
            // Named, never echoed: the byte may be an escape sequence or half a UTF-8 character.
            let b = bytes[pos]
            if b > 0x20 && b < 0x7F { throw error("unexpected character '\(Character(Unicode.Scalar(b)))'") }
            throw error("unexpected byte 0x\(b < 0x10 ? "0" : "")\(String(b, radix: 16, uppercase: true))")
        }
    }

    private mutating func expectWord(_ word: String) throws(JSONSyntaxError) {
        let w = Array(word.utf8)
        guard pos + w.count <= bytes.count else { throw error("unexpected end of the document") }
        for (k, c) in w.enumerated() where bytes[pos + k] != c { throw error("invalid literal") }
        pos += w.count
    }

    private mutating func enter() throws(JSONSyntaxError) {
        depth += 1
        if depth > 512 { throw error("document nested too deeply") }
    }

    private mutating func parseObject() throws(JSONSyntaxError) -> JSONValue {
        try enter(); defer { depth -= 1 }
        pos += 1
        var dict = JSONObject()
        skipWhitespace()
        if pos < bytes.count && bytes[pos] == UInt8(ascii: "}") { pos += 1; return .object(dict) }
        while true {
            skipWhitespace()
            guard pos < bytes.count, bytes[pos] == UInt8(ascii: "\"") else { throw error("expected a quoted key") }
            let key = try parseString()
            skipWhitespace()
            guard pos < bytes.count, bytes[pos] == UInt8(ascii: ":") else { throw error("expected ':' after a key") }
            pos += 1
            skipWhitespace()
            if depth == 1, itemSink != nil, key == "items", pos < bytes.count, bytes[pos] == UInt8(ascii: "[") {
                dict.append(key, try parseStreamedItems())
            } else {
                dict.append(key, try parseValue())
            }
            skipWhitespace()
            guard pos < bytes.count else { throw error("unexpected end of the document inside an object") }
            if bytes[pos] == UInt8(ascii: ",") { pos += 1; continue }
            if bytes[pos] == UInt8(ascii: "}") { pos += 1; return .object(dict) }
            throw error("expected ',' or '}'")
        }
    }

    private mutating func parseStreamedItems() throws(JSONSyntaxError) -> JSONValue {
        try enter(); defer { depth -= 1 }
        pos += 1
        var kept: [JSONValue] = []
        skipWhitespace()
        if pos < bytes.count && bytes[pos] == UInt8(ascii: "]") { pos += 1; return .array(kept) }
        guard try continueItems(into: &kept) else { stopped = true; throw error("stopped") }
        return .array(kept)
    }

    /// Items from `pos` (an item's first byte) through the list's `]`, each handed to the sink. False when
    /// the sink (or the hand-over's tail) said stop.
    private mutating func continueItems(into kept: inout [JSONValue]) throws(JSONSyntaxError) -> Bool {
        while true {
            skipWhitespace()
            if let handOver, handOver.startsHere(pos) {
                self.handOver = nil
                guard let tail = try handOver.take() else { return false }
                kept += tail.kept
                pos = tail.end
                return true
            }
            let item = try parseValue()
            switch itemSink!(item) {
            case .consumed: break
            case .keep: kept.append(item)
            case .stop: stopped = true; throw error("stopped")
            }
            skipWhitespace()
            guard pos < bytes.count else { throw error("unexpected end of the document inside a list") }
            if bytes[pos] == UInt8(ascii: ",") { pos += 1; continue }
            if bytes[pos] == UInt8(ascii: "]") { pos += 1; return true }
            throw error("expected ',' or ']'")
        }
    }

    private mutating func parseArray() throws(JSONSyntaxError) -> JSONValue {
        try enter(); defer { depth -= 1 }
        pos += 1
        var items: [JSONValue] = []
        skipWhitespace()
        if pos < bytes.count && bytes[pos] == UInt8(ascii: "]") { pos += 1; return .array(items) }
        while true {
            skipWhitespace()
            items.append(try parseValue())
            skipWhitespace()
            guard pos < bytes.count else { throw error("unexpected end of the document inside a list") }
            if bytes[pos] == UInt8(ascii: ",") { pos += 1; continue }
            if bytes[pos] == UInt8(ascii: "]") { pos += 1; return .array(items) }
            throw error("expected ',' or ']'")
        }
    }

    private mutating func parseNumber() throws(JSONSyntaxError) -> JSONValue {
        let start = pos
        var integral = true
        if bytes[pos] == UInt8(ascii: "-") { pos += 1 }
        guard pos < bytes.count, bytes[pos] >= 48, bytes[pos] <= 57 else { throw error("invalid number") }
        if bytes[pos] == 48, pos + 1 < bytes.count, bytes[pos + 1] >= 48, bytes[pos + 1] <= 57 {
            throw error("invalid number (leading zero)")
        }
        while pos < bytes.count {
            let c = bytes[pos]
            if c >= 48 && c <= 57 { pos += 1; continue }
            if c == UInt8(ascii: ".") || c == UInt8(ascii: "e") || c == UInt8(ascii: "E")
                || ((c == UInt8(ascii: "+") || c == UInt8(ascii: "-")) && integral == false) {
                integral = false; pos += 1; continue
            }
            break
        }
        let text = String(decoding: UnsafeBufferPointer(rebasing: bytes[start..<pos]), as: UTF8.self)
        if integral, let i = Int(text) { return .int(i) }
        guard let d = Double(text) else { throw error("invalid number '\(text)'") }
        return .double(d)
    }

    private mutating func parseString() throws(JSONSyntaxError) -> String {
        pos += 1
        let start = pos
        // Fast path: no escapes.
        while pos < bytes.count {
            let c = bytes[pos]
            if c == UInt8(ascii: "\"") {
                let s = String(decoding: UnsafeBufferPointer(rebasing: bytes[start..<pos]), as: UTF8.self)
                pos += 1
                return s
            }
            if c == UInt8(ascii: "\\") { break }
            if c < 0x20 { throw error("control character in a string") }
            pos += 1
        }
        var out = Array(bytes[start..<pos])
        while pos < bytes.count {
            let c = bytes[pos]
            if c == UInt8(ascii: "\"") { pos += 1; return String(decoding: out, as: UTF8.self) }
            if c < 0x20 { throw error("control character in a string") }
            if c != UInt8(ascii: "\\") { out.append(c); pos += 1; continue }
            pos += 1
            guard pos < bytes.count else { break }
            let e = bytes[pos]
            pos += 1
            switch e {
            case UInt8(ascii: "\""): out.append(0x22)
            case UInt8(ascii: "\\"): out.append(0x5C)
            case UInt8(ascii: "/"): out.append(0x2F)
            case UInt8(ascii: "b"): out.append(0x08)
            case UInt8(ascii: "f"): out.append(0x0C)
            case UInt8(ascii: "n"): out.append(0x0A)
            case UInt8(ascii: "r"): out.append(0x0D)
            case UInt8(ascii: "t"): out.append(0x09)
            case UInt8(ascii: "u"):
                var scalar = try readHex4()
                if scalar >= 0xD800 && scalar < 0xDC00 {
                    guard pos + 1 < bytes.count, bytes[pos] == UInt8(ascii: "\\"), bytes[pos + 1] == UInt8(ascii: "u") else {
                        throw error("unpaired surrogate in a string")
                    }
                    pos += 2
                    let lowHalf = try readHex4()
                    guard lowHalf >= 0xDC00 && lowHalf < 0xE000 else { throw error("unpaired surrogate in a string") }
                    scalar = 0x10000 + ((scalar - 0xD800) << 10) + (lowHalf - 0xDC00)
                } else if scalar >= 0xDC00 && scalar < 0xE000 {
                    throw error("unpaired surrogate in a string")
                }
                guard let u = Unicode.Scalar(scalar) else { throw error("invalid \\u escape") }
                out.append(contentsOf: Array(String(Character(u)).utf8))
            default:
                throw error("invalid escape in a string")
            }
        }
        throw error("unterminated string")
    }

    private mutating func readHex4() throws(JSONSyntaxError) -> UInt32 {
        guard pos + 4 <= bytes.count else { throw error("truncated \\u escape") }
        var v: UInt32 = 0
        for _ in 0..<4 {
            let c = bytes[pos]
            let d: UInt32
            switch c {
            case 48...57: d = UInt32(c - 48)
            case 97...102: d = UInt32(c - 87)
            case 65...70: d = UInt32(c - 55)
            default: throw error("invalid \\u escape")
            }
            v = v << 4 | d
            pos += 1
        }
        return v
    }
}

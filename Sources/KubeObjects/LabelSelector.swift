/// A label selector in kubectl's `-l` syntax: `a=b`, `a==b`, `a!=b`, `a in (x,y)`, `a notin (x)`, `a`, `!a`,
/// joined by commas. The same text is sent to the API server when reading live, so both paths agree.
public struct LabelSelector: Sendable, Equatable, CustomStringConvertible {
    public enum Requirement: Sendable, Equatable {
        case equals(String, String)
        case notEquals(String, String)
        case `in`(String, [String])
        case notIn(String, [String])
        case exists(String)
        case doesNotExist(String)
    }

    public let requirements: [Requirement]
    public let description: String

    public struct ParseError: Error, Sendable, Equatable, CustomStringConvertible {
        public let message: String
        public var description: String { message }
    }

    public init(_ text: String) throws(ParseError) {
        description = text
        var reqs: [Requirement] = []
        let chars = Array(text)
        var i = 0
        func skipSpaces() { while i < chars.count && chars[i] == " " { i += 1 } }
        func fail(_ m: String) -> ParseError { ParseError(message: "invalid label selector \"\(text)\": \(m)") }
        func readKey() throws(ParseError) -> String {
            skipSpaces()
            let start = i
            while i < chars.count, LabelSelector.isKeyChar(chars[i]) { i += 1 }
            guard i > start else { throw fail("expected a label key at position \(start + 1)") }
            return String(chars[start..<i])
        }
        func readValue() -> String {
            skipSpaces()
            let start = i
            while i < chars.count, LabelSelector.isValueChar(chars[i]) { i += 1 }
            return String(chars[start..<i])
        }
        func readWord() -> String {
            skipSpaces()
            let start = i
            while i < chars.count, chars[i].isLetter { i += 1 }
            return String(chars[start..<i])
        }
        func readSet() throws(ParseError) -> [String] {
            skipSpaces()
            guard i < chars.count, chars[i] == "(" else { throw fail("expected '(' after in/notin") }
            i += 1
            var values: [String] = []
            while true {
                values.append(readValue())
                skipSpaces()
                guard i < chars.count else { throw fail("missing ')'") }
                if chars[i] == "," { i += 1; continue }
                if chars[i] == ")" { i += 1; break }
                throw fail("unexpected '\(chars[i])' in a value list")
            }
            return values
        }
        skipSpaces()
        if i == chars.count { requirements = []; return }
        while true {
            skipSpaces()
            if i < chars.count, chars[i] == "!" {
                i += 1
                reqs.append(.doesNotExist(try readKey()))
            } else {
                let key = try readKey()
                skipSpaces()
                if i + 1 < chars.count, chars[i] == "!", chars[i + 1] == "=" {
                    i += 2; reqs.append(.notEquals(key, readValue()))
                } else if i + 1 < chars.count, chars[i] == "=", chars[i + 1] == "=" {
                    i += 2; reqs.append(.equals(key, readValue()))
                } else if i < chars.count, chars[i] == "=" {
                    i += 1; reqs.append(.equals(key, readValue()))
                } else if i < chars.count, chars[i] != "," {
                    let save = i
                    let word = readWord()
                    switch word {
                    case "in": reqs.append(.in(key, try readSet()))
                    case "notin": reqs.append(.notIn(key, try readSet()))
                    default: i = save; throw fail("unexpected text at position \(save + 1)")
                    }
                } else {
                    reqs.append(.exists(key))
                }
            }
            skipSpaces()
            if i == chars.count { break }
            guard chars[i] == "," else { throw fail("expected ',' at position \(i + 1)") }
            i += 1
        }
        requirements = reqs
    }

    static func isKeyChar(_ c: Character) -> Bool {
        c.isASCII && (c.isLetter || c.isNumber || c == "-" || c == "_" || c == "." || c == "/")
    }
    static func isValueChar(_ c: Character) -> Bool {
        c.isASCII && (c.isLetter || c.isNumber || c == "-" || c == "_" || c == ".")
    }

    public func matches(_ labels: [String: String]) -> Bool {
        requirements.allSatisfy { r in
            switch r {
            case .equals(let k, let v): return labels[k] == v
            case .notEquals(let k, let v): return labels[k] != v
            case .in(let k, let vs): return labels[k].map(vs.contains) ?? false
            case .notIn(let k, let vs): return !(labels[k].map(vs.contains) ?? false)
            case .exists(let k): return labels[k] != nil
            case .doesNotExist(let k): return labels[k] == nil
            }
        }
    }
}

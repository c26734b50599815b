import CYaml

/// A cheap pass over YAML's event stream, before anything builds a tree, that refuses what would cost
/// more memory or time than the text suggests: aliases that expand to many times the document ("billion
/// laughs"), and nesting deeper than a parser's stack.
///
/// Why before Yams: Yams' composer hashes every mapping key to find duplicates, and a key that is an alias
/// of a nested structure is hashed in full, so an expansion bomb costs exponential time inside `compose`
/// already, before our converter sees a node. Counting here costs one libyaml parse and no tree.
///
/// The event stream comes from the libyaml that Yams vendors (its `CYaml` module); this file is the only
/// place in KubeObjects that touches C.
public enum YAMLBudget {
    /// Deepest nesting accepted (the JSON parser's limit too); Kubernetes objects need about 10.
    public static let maxDepth = 512
    /// With aliases expanded, a stream may hold `aliasFactor` times the nodes its text holds, plus
    /// `aliasAllowance`. Hand-written anchors (shared labels, ports) add a few dozen nodes; a bomb adds
    /// billions. kubectl's YAML library allows about as much (99% aliases up to 400,000 nodes).
    public static let aliasFactor = 4
    public static let aliasAllowance = 400_000

    public enum Violation: Error, Sendable, Equatable, CustomStringConvertible {
        /// Aliases would expand the stream to more than `limit` nodes (its text holds `written`).
        case aliasExpansion(written: Int, limit: Int)
        case tooDeep(limit: Int, line: Int)

        public var description: String {
            switch self {
            case .aliasExpansion(let written, let limit):
                return "YAML aliases expand to more than \(limit) nodes (the text itself holds \(written)): excessive aliasing is refused"
            case .tooDeep(let limit, let line):
                return "YAML nested deeper than \(limit) levels (line \(line))"
            }
        }
    }

    /// Checks the whole stream. Syntax errors are not reported here (the caller's YAML parser reports
    /// them with its own message); scanning simply stops at the first one.
    public static func check(_ bytes: [UInt8]) throws(Violation) {
        var parser = yaml_parser_t()
        guard yaml_parser_initialize(&parser) == 1 else { return }
        defer { yaml_parser_delete(&parser) }
        var result: Violation? = nil
        bytes.withUnsafeBufferPointer { buffer in
            yaml_parser_set_encoding(&parser, YAML_UTF8_ENCODING)
            yaml_parser_set_input_string(&parser, buffer.baseAddress, buffer.count)
            result = scan(&parser)
        }
        if let result { throw result }
    }

    private static func scan(_ parser: inout yaml_parser_t) -> Violation? {
        /// Expanded sizes of the collections still open, innermost last, with their anchors.
        var open: [(size: Int, anchor: String?)] = []
        /// Expanded size of every anchored node seen so far (a later anchor of the same name replaces it).
        var anchors: [String: Int] = [:]
        var written = 0
        var total = 0
        var event = yaml_event_t()
        func add(_ n: Int) {
            total = total &+ n
            if !open.isEmpty { open[open.count - 1].size = open[open.count - 1].size &+ n }
        }
        func name(_ p: UnsafeMutablePointer<yaml_char_t>?) -> String? {
            p.map { String(cString: UnsafeRawPointer($0).assumingMemoryBound(to: CChar.self)) }
        }
        while true {
            guard yaml_parser_parse(&parser, &event) == 1 else { return nil }
            defer { yaml_event_delete(&event) }
            switch event.type {
            case YAML_STREAM_END_EVENT:
                return nil
            case YAML_SCALAR_EVENT:
                written += 1
                add(1)
                if let a = name(event.data.scalar.anchor) { anchors[a] = 1 }
            case YAML_SEQUENCE_START_EVENT, YAML_MAPPING_START_EVENT:
                written += 1
                add(1)
                let a = event.type == YAML_SEQUENCE_START_EVENT
                    ? name(event.data.sequence_start.anchor) : name(event.data.mapping_start.anchor)
                open.append((1, a))
                if open.count > maxDepth { return .tooDeep(limit: maxDepth, line: Int(event.start_mark.line) + 1) }
            case YAML_SEQUENCE_END_EVENT, YAML_MAPPING_END_EVENT:
                guard let closed = open.popLast() else { return nil }
                if !open.isEmpty { open[open.count - 1].size = open[open.count - 1].size &+ closed.size }
                if let a = closed.anchor { anchors[a] = closed.size }
            case YAML_ALIAS_EVENT:
                // An alias of an anchor still open (or unknown) is an error for the composer; count it as one.
                add(name(event.data.alias.anchor).flatMap { anchors[$0] } ?? 1)
            default:
                break
            }
            let limit = aliasFactor &* written &+ aliasAllowance
            if total > limit { return .aliasExpansion(written: written, limit: limit) }
        }
    }
}

// Grants or revokes a principal's ACLs on Kafka topics, through the Admin API of the jars the
// tests run Kafka from (kafka-clients). Run in Java's source-file mode:
//
//   java -cp 'jars/*' KafkaAcl.java BOOTSTRAP grant|revoke User:NAME TOPIC...
//
// grant: WRITE, DESCRIBE and CREATE on each topic; revoke: every ACL of the principal on them.
// Exits non-zero (with the exception) when the broker refuses.

import java.util.ArrayList;
import java.util.List;
import java.util.Properties;

import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.common.acl.AccessControlEntry;
import org.apache.kafka.common.acl.AccessControlEntryFilter;
import org.apache.kafka.common.acl.AclBinding;
import org.apache.kafka.common.acl.AclBindingFilter;
import org.apache.kafka.common.acl.AclOperation;
import org.apache.kafka.common.acl.AclPermissionType;
import org.apache.kafka.common.resource.PatternType;
import org.apache.kafka.common.resource.ResourcePattern;
import org.apache.kafka.common.resource.ResourcePatternFilter;
import org.apache.kafka.common.resource.ResourceType;

public class KafkaAcl {
    public static void main(String[] args) throws Exception {
        Properties props = new Properties();
        props.put("bootstrap.servers", args[0]);
        String principal = args[2];
        try (Admin admin = Admin.create(props)) {
            if (args[1].equals("grant")) {
                List<AclBinding> bindings = new ArrayList<>();
                for (int i = 3; i < args.length; i++) {
                    ResourcePattern topic =
                            new ResourcePattern(ResourceType.TOPIC, args[i], PatternType.LITERAL);
                    for (AclOperation op : List.of(
                            AclOperation.WRITE, AclOperation.DESCRIBE, AclOperation.CREATE)) {
                        bindings.add(new AclBinding(topic, new AccessControlEntry(
                                principal, "*", op, AclPermissionType.ALLOW)));
                    }
                }
                admin.createAcls(bindings).all().get();
            } else {
                List<AclBindingFilter> filters = new ArrayList<>();
                for (int i = 3; i < args.length; i++) {
                    filters.add(new AclBindingFilter(
                            new ResourcePatternFilter(
                                    ResourceType.TOPIC, args[i], PatternType.LITERAL),
                            new AccessControlEntryFilter(
                                    principal, null, AclOperation.ANY, AclPermissionType.ANY)));
                }
                admin.deleteAcls(filters).all().get();
            }
        }
    }
}

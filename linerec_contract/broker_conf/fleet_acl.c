/*
 * fleet_acl: the subscription guard of the line-recorder broker (mosquitto 2.0 plugin, API v5).
 *
 * mosquitto's acl_file is checked when a message is delivered, never when a client subscribes:
 * any client may subscribe to any filter, including "$share/<group>/..." filters. A box holding
 * a valid fleet certificate could therefore join central's shared subscription; the broker would
 * hand it a share of every box's segments and then drop them at delivery (read denied), so
 * central would miss them until each box retransmits. This plugin refuses such subscriptions.
 *
 * Rules (the user name is the certificate's CN: use_identity_as_username):
 *   - a central user (plugin_opt_central_users, comma separated; an entry ending in '*' is a
 *     prefix, e.g. "central-*" for the certificates of several receivers and fleet tools) may
 *     subscribe to, read and write any topic under the topic root, plain or shared;
 *   - any other user (a box) may subscribe only to filters that start with
 *     "<root>/<its user name>/" and never to a shared ("$share/...") filter;
 *   - every other subscription is refused (SUBACK "not authorized"); unsubscribing is allowed.
 * A box's reading and publishing are left to the acl_file (this plugin answers "defer").
 * The fleet CA never issues a box certificate whose CN matches a central user.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>

#define MAX_USERS 64

static mosquitto_plugin_id_t *plugin_id;
static char *central_users[MAX_USERS];
static int central_count;
static char *topic_root;

static int is_central(const char *user)
{
	if(user == NULL) return 0;
	for(int i = 0; i < central_count; i++){
		size_t len = strlen(central_users[i]);
		if(len > 1 && central_users[i][len - 1] == '*'){
			if(strncmp(user, central_users[i], len - 1) == 0 && user[len - 1] != '\0') return 1;
		}else if(strcmp(user, central_users[i]) == 0){
			return 1;
		}
	}
	return 0;
}

static int under(const char *filter, const char *prefix, size_t len)
{
	return strncmp(filter, prefix, len) == 0 && filter[len] == '/';
}

static int subscribe_allowed(const char *user, const char *filter)
{
	size_t root_len = strlen(topic_root);
	if(user == NULL || filter == NULL) return 0;
	if(is_central(user)){
		if(strncmp(filter, "$share/", 7) == 0){
			const char *slash = strchr(filter + 7, '/');
			if(slash == NULL) return 0;
			filter = slash + 1;
		}
		return under(filter, topic_root, root_len);
	}
	if(filter[0] == '$') return 0; /* $share/..., $SYS/..., $CONTROL/... */
	if(!under(filter, topic_root, root_len)) return 0;
	const char *rest = filter + root_len + 1;
	size_t user_len = strlen(user);
	return strncmp(rest, user, user_len) == 0 && rest[user_len] == '/';
}

static int acl_check(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_acl_check *ed = event_data;
	(void)event;
	(void)userdata;
	const char *user = mosquitto_client_username(ed->client);
	if(ed->access == MOSQ_ACL_UNSUBSCRIBE) return MOSQ_ERR_SUCCESS;
	if(ed->access != MOSQ_ACL_SUBSCRIBE){
		if(is_central(user) && ed->topic && under(ed->topic, topic_root, strlen(topic_root))){
			return MOSQ_ERR_SUCCESS;
		}
		return MOSQ_ERR_PLUGIN_DEFER;
	}
	if(subscribe_allowed(user, ed->topic)) return MOSQ_ERR_PLUGIN_DEFER;
	mosquitto_log_printf(MOSQ_LOG_NOTICE, "fleet_acl: refused subscription of %s (user %s) to %s",
			mosquitto_client_id(ed->client), user ? user : "(none)", ed->topic);
	return MOSQ_ERR_ACL_DENIED;
}

int mosquitto_plugin_version(int supported_version_count, const int *supported_versions)
{
	for(int i = 0; i < supported_version_count; i++){
		if(supported_versions[i] == 5) return 5;
	}
	return -1;
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **userdata,
		struct mosquitto_opt *opts, int opt_count)
{
	(void)userdata;
	plugin_id = identifier;
	topic_root = NULL;
	central_count = 0;
	for(int i = 0; i < opt_count; i++){
		if(strcmp(opts[i].key, "topic_root") == 0){
			topic_root = strdup(opts[i].value);
		}else if(strcmp(opts[i].key, "central_users") == 0){
			char *copy = strdup(opts[i].value);
			char *save = NULL;
			for(char *tok = strtok_r(copy, ", ", &save); tok && central_count < MAX_USERS;
					tok = strtok_r(NULL, ", ", &save)){
				central_users[central_count++] = strdup(tok);
			}
			free(copy);
		}
	}
	if(topic_root == NULL || topic_root[0] == '\0' || central_count == 0){
		mosquitto_log_printf(MOSQ_LOG_ERR,
				"fleet_acl: plugin_opt_topic_root and plugin_opt_central_users are required");
		return MOSQ_ERR_INVAL;
	}
	return mosquitto_callback_register(plugin_id, MOSQ_EVT_ACL_CHECK, acl_check, NULL, NULL);
}

int mosquitto_plugin_cleanup(void *userdata, struct mosquitto_opt *opts, int opt_count)
{
	(void)userdata;
	(void)opts;
	(void)opt_count;
	for(int i = 0; i < central_count; i++) free(central_users[i]);
	central_count = 0;
	free(topic_root);
	topic_root = NULL;
	return mosquitto_callback_unregister(plugin_id, MOSQ_EVT_ACL_CHECK, acl_check, NULL);
}
